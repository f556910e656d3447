//! One request against the sandbox's policy: host lists, per-host rules, and the guards, in
//! a fixed order, with warn mode turning a refusal into a logged pass.

use std::net::IpAddr;

use crate::audit::Decision;
use crate::policy::{
    is_guarded_address, HostDecision, HostRule, Mode, RequestDecision, SandboxPolicy, DOH_RULE,
};

/// What happens to a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict<'p> {
    /// allow, deny or warn (warn = would have been denied, let through).
    pub decision: Decision,
    pub rule: String,
    pub reason: Option<String>,
    /// Machine-readable reason for `X-Egress-Denied`.
    pub code: &'static str,
    /// The host rule whose header edits apply.
    pub host_rule: Option<&'p HostRule>,
}

impl Verdict<'_> {
    pub fn denied(&self) -> bool {
        self.decision == Decision::Deny
    }
}

struct Refusal {
    reason: String,
    rule: String,
    code: &'static str,
}

/// What a request is judged on.
pub struct Subject<'a> {
    pub sni: Option<&'a str>,
    pub host: &'a str,
    pub method: &'a http::Method,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The address the client connected to.
    pub dst: IpAddr,
}

/// Media types of DNS messages carried over HTTP (RFC 8484, and the JSON API of public
/// resolvers).
const DOH_MEDIA_TYPES: [&str; 2] = ["application/dns-message", "application/dns-json"];

/// Checks, in order: the TLS server name, SNI/Host agreement (domain fronting), the host
/// lists and per-host rules, DNS messages over HTTP, DNS pinning, and private destinations
/// (SSRF). The first refusal decides. `resolved(name)` says whether `name` resolved to the
/// destination through the DNS listener.
pub fn request<'p>(
    p: &'p SandboxPolicy,
    s: &Subject<'_>,
    resolved: &dyn Fn(&str) -> bool,
) -> Verdict<'p> {
    let Subject {
        sni,
        host,
        method,
        path,
        headers,
        dst,
    } = *s;
    let mut refusal = None;
    if let Some(sni) = sni {
        if let HostDecision::Deny { reason, rule } = p.host_decision(sni) {
            refusal = Some(Refusal {
                reason: format!("TLS server name: {reason}"),
                code: host_code(&rule),
                rule,
            });
        } else if p.guards.domain_fronting && sni != host {
            refusal = Some(Refusal {
                reason: format!("TLS server name {sni} and Host {host} differ (domain fronting)"),
                rule: String::new(),
                code: "domain-fronting",
            });
        }
    }
    let (rule, host_rule) = match p.request_decision(host, method, path) {
        RequestDecision::Deny { reason, rule } => {
            refusal.get_or_insert(Refusal {
                reason,
                code: if rule == DOH_RULE { "doh" } else { "policy" },
                rule,
            });
            (String::new(), None)
        }
        RequestDecision::Allow { rule } => {
            (rule.map(|r| r.host.to_string()).unwrap_or_default(), rule)
        }
    };
    if refusal.is_none() && p.guards.doh {
        refusal = doh_message_refusal(headers).or_else(|| doh_address_refusal(p, dst));
    }
    if refusal.is_none() {
        refusal = pinning_refusal(p, sni.unwrap_or(host), dst, resolved);
    }
    if refusal.is_none() {
        if let Some(r) = private_refusal(p, dst) {
            refusal = Some(r);
        }
    }
    let rule = if rule.is_empty() {
        match p.host_decision(host) {
            HostDecision::Allow { rule } | HostDecision::Passthrough { rule } => rule,
            HostDecision::Deny { .. } => String::new(),
        }
    } else {
        rule
    };
    match refusal {
        None => Verdict {
            decision: Decision::Allow,
            rule,
            reason: None,
            code: "",
            host_rule,
        },
        Some(r) if p.mode == Mode::Warn => Verdict {
            decision: Decision::Warn,
            rule: r.rule,
            reason: Some(r.reason),
            code: r.code,
            host_rule,
        },
        Some(r) => Verdict {
            decision: Decision::Deny,
            rule: r.rule,
            reason: Some(r.reason),
            code: r.code,
            host_rule: None,
        },
    }
}

fn host_code(rule: &str) -> &'static str {
    if rule == DOH_RULE {
        "doh"
    } else {
        "host-not-allowed"
    }
}

/// The DoH guard's second half: DNS messages to any host, not only the well-known ones.
fn doh_message_refusal(headers: &http::HeaderMap) -> Option<Refusal> {
    let carries_dns = [http::header::CONTENT_TYPE, http::header::ACCEPT]
        .iter()
        .flat_map(|h| headers.get_all(h))
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            let v = v.to_ascii_lowercase();
            DOH_MEDIA_TYPES.iter().any(|t| v.contains(t))
        });
    carries_dns.then(|| Refusal {
        reason: "DNS messages over HTTP (DNS over HTTPS, guard `doh`)".into(),
        rule: DOH_RULE.into(),
        code: "doh",
    })
}

/// The DoH guard on the destination: a well-known resolver's address, whatever name the
/// client gave.
fn doh_address_refusal(p: &SandboxPolicy, dst: IpAddr) -> Option<Refusal> {
    let ip = dst.to_canonical().to_string();
    p.doh_denied(&ip).then(|| Refusal {
        reason: format!("{ip} is a well-known DNS-over-HTTPS resolver (guard `doh`)"),
        rule: DOH_RULE.into(),
        code: "doh",
    })
}

/// DNS pinning: `name` must have resolved to `dst` through the DNS listener. IP-literal
/// hosts are judged by the IP rules instead.
fn pinning_refusal(
    p: &SandboxPolicy,
    name: &str,
    dst: IpAddr,
    resolved: &dyn Fn(&str) -> bool,
) -> Option<Refusal> {
    let name = crate::policy::normalize_host(name);
    if !p.dns_pinning {
        return None;
    }
    // An address in place of a name must be the destination itself; otherwise an allowed
    // IP entry would carry a request to any other address.
    if let Ok(ip) = name.parse::<IpAddr>() {
        if ip.to_canonical() == dst.to_canonical() {
            return None;
        }
        return Some(Refusal {
            reason: format!(
                "DNS pinning: the request names {ip} but was sent to {}",
                dst.to_canonical()
            ),
            rule: String::new(),
            code: "dns-pinning",
        });
    }
    if resolved(&name) {
        return None;
    }
    Some(Refusal {
        reason: format!(
            "DNS pinning: {name} did not resolve to {} through egress's DNS",
            dst.to_canonical()
        ),
        rule: String::new(),
        code: "dns-pinning",
    })
}

/// The SSRF guard: loopback, link-local, metadata and private destinations are refused
/// unless the policy names them (`private_ok`, or an IP/CIDR in the allow list).
fn private_refusal(p: &SandboxPolicy, dst: IpAddr) -> Option<Refusal> {
    let dst = dst.to_canonical();
    if !p.guards.private_ranges || !is_guarded_address(dst) || p.private_ok(dst) {
        return None;
    }
    let named = p
        .allow
        .iter()
        .chain(&p.passthrough)
        .any(|pat| matches!(pat, crate::policy::HostPattern::Net(n) if n.contains(dst)));
    (!named).then(|| Refusal {
        reason: format!("destination {dst} is in a private, loopback or link-local range"),
        rule: String::new(),
        code: "private-destination",
    })
}

/// For connections refused before any request (passthrough): DNS pinning of the server
/// name, and the private-range guard.
pub fn connection_refusal(
    p: &SandboxPolicy,
    name: &str,
    dst: IpAddr,
    resolved: &dyn Fn(&str) -> bool,
) -> Option<String> {
    let r = pinning_refusal(p, name, dst, resolved)
        .or_else(|| p.guards.doh.then(|| doh_address_refusal(p, dst)).flatten())
        .or_else(|| private_refusal(p, dst))?;
    (p.mode != Mode::Warn).then_some(r.reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, PolicyFlags};

    fn policy(flags: PolicyFlags) -> SandboxPolicy {
        compile(None, None, &flags).expect("flags compile").sandbox
    }

    fn allow(hosts: &[&str]) -> PolicyFlags {
        PolicyFlags {
            allow: hosts.iter().map(|h| h.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    fn judge(
        p: &SandboxPolicy,
        host: &str,
        headers: &http::HeaderMap,
        resolved: bool,
    ) -> (&'static str, &'static str) {
        let v = request(
            p,
            &Subject {
                sni: Some(host),
                host,
                method: &http::Method::GET,
                path: "/",
                headers,
                dst: "203.0.113.9".parse().unwrap(),
            },
            &|_| resolved,
        );
        (v.decision.as_str(), v.code)
    }

    #[test]
    fn pinning_refuses_names_that_did_not_resolve_to_the_destination() {
        let none = http::HeaderMap::new();
        let mut flags = allow(&["api.example"]);
        assert_eq!(
            judge(&policy(flags.clone()), "api.example", &none, false),
            ("allow", ""),
            "pinning is off by default"
        );
        flags.dns_pinning = true;
        let p = policy(flags);
        assert_eq!(judge(&p, "api.example", &none, true), ("allow", ""));
        assert_eq!(
            judge(&p, "api.example", &none, false),
            ("deny", "dns-pinning")
        );
        // An IP literal in place of the name must be the destination itself.
        let mut flags = allow(&["10.0.0.0/8"]);
        flags.dns_pinning = true;
        let by_ip = policy(flags);
        let v = request(
            &by_ip,
            &Subject {
                sni: None,
                host: "10.1.2.3",
                method: &http::Method::GET,
                path: "/",
                headers: &none,
                dst: "198.51.100.66".parse().unwrap(),
            },
            &|_| false,
        );
        assert_eq!(v.code, "dns-pinning", "{v:?}");
        // A host refused by the lists is reported as such, not as a pinning failure.
        assert_eq!(
            judge(&p, "other.example", &none, false),
            ("deny", "host-not-allowed")
        );
    }

    #[test]
    fn dns_messages_over_http_are_refused_to_any_host() {
        let p = policy(allow(&["api.example"]));
        for (h, v) in [
            (http::header::ACCEPT, "application/dns-message"),
            (http::header::CONTENT_TYPE, "application/dns-message"),
            (http::header::ACCEPT, "application/dns-json, */*"),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(h.clone(), http::HeaderValue::from_static(v));
            assert_eq!(
                judge(&p, "api.example", &headers, true),
                ("deny", "doh"),
                "{h}: {v}"
            );
        }
        let mut flags = allow(&["api.example"]);
        flags.no_doh_guard = true;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/dns-message"),
        );
        assert_eq!(
            judge(&policy(flags), "api.example", &headers, true),
            ("allow", "")
        );
    }

    #[test]
    fn well_known_doh_hosts_are_refused_under_a_wildcard() {
        let p = policy(allow(&["*"]));
        let none = http::HeaderMap::new();
        assert_eq!(judge(&p, "dns.google", &none, true), ("deny", "doh"));
        // An allowed name sent to a resolver's address.
        let v = request(
            &p,
            &Subject {
                sni: Some("example.org"),
                host: "example.org",
                method: &http::Method::GET,
                path: "/dns-query",
                headers: &none,
                dst: "1.1.1.1".parse().unwrap(),
            },
            &|_| true,
        );
        assert_eq!((v.decision, v.code), (Decision::Deny, "doh"));
        assert_eq!(judge(&p, "example.org", &none, true), ("allow", ""));
    }
}
