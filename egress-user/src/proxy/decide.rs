//! One request against the sandbox's policy: host lists, per-host rules, and the guards, in
//! a fixed order, with warn mode turning a refusal into a logged pass.

use std::net::IpAddr;

use serde::Serialize;

use crate::audit::Decision;
use crate::policy::{
    hint::Fix, is_doh_address, is_guarded_address, HostDecision, HostRule, Mode, RequestDecision,
    SandboxPolicy, DOH_RULE,
};

/// Why a request was refused, for machines: the `X-Egress-Denied` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyCode {
    /// The TLS server name is not allowed.
    HostNotAllowed,
    /// SNI and Host name different servers.
    DomainFronting,
    /// The host lists or a per-host rule.
    Policy,
    /// DNS over HTTPS.
    Doh,
    /// The name did not resolve to the destination through egress's DNS.
    DnsPinning,
    /// A private, loopback or link-local destination (SSRF).
    PrivateDestination,
    /// A secret (placeholder or real value) bound for a host it is not for.
    SecretNotAuthorized,
    /// A placeholder could not be swapped for its value.
    SecretSubstitutionFailed,
}

impl DenyCode {
    pub const ALL: [DenyCode; 8] = [
        DenyCode::HostNotAllowed,
        DenyCode::DomainFronting,
        DenyCode::Policy,
        DenyCode::Doh,
        DenyCode::DnsPinning,
        DenyCode::PrivateDestination,
        DenyCode::SecretNotAuthorized,
        DenyCode::SecretSubstitutionFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::HostNotAllowed => "host-not-allowed",
            DenyCode::DomainFronting => "domain-fronting",
            DenyCode::Policy => "policy",
            DenyCode::Doh => "doh",
            DenyCode::DnsPinning => "dns-pinning",
            DenyCode::PrivateDestination => "private-destination",
            DenyCode::SecretNotAuthorized => "secret-not-authorized",
            DenyCode::SecretSubstitutionFailed => "secret-substitution-failed",
        }
    }
}

/// What happens to a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict<'p> {
    /// allow, deny or warn (warn = would have been denied, let through).
    pub decision: Decision,
    pub rule: String,
    pub reason: Option<String>,
    /// Why it was refused (or, in warn mode, would have been); `None` when allowed.
    pub code: Option<DenyCode>,
    /// The host rule whose header edits apply.
    pub host_rule: Option<&'p HostRule>,
    /// What would let it through, in a line; `None` when allowed.
    pub hint: Option<String>,
}

impl Verdict<'_> {
    pub fn denied(&self) -> bool {
        self.decision == Decision::Deny
    }
}

struct Refusal {
    reason: String,
    rule: String,
    code: DenyCode,
    fix: Fix,
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
                fix: Fix::for_host(sni, &rule),
                rule,
            });
        } else if p.guards.domain_fronting && sni != host {
            refusal = Some(Refusal {
                reason: format!("TLS server name {sni} and Host {host} differ (domain fronting)"),
                rule: String::new(),
                code: DenyCode::DomainFronting,
                fix: Fix::Fronting,
            });
        }
    }
    let (rule, host_rule) = match p.request_decision(host, method, path) {
        RequestDecision::Deny { reason, rule, fix } => {
            refusal.get_or_insert(Refusal {
                reason,
                fix,
                code: if rule == DOH_RULE {
                    DenyCode::Doh
                } else {
                    DenyCode::Policy
                },
                rule,
            });
            (String::new(), None)
        }
        // The host rule names the request when one applies, else the list entry that
        // admitted its host.
        RequestDecision::Allow { rule, listed } => {
            (rule.map_or(listed, |r| r.host.to_string()), rule)
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
    match refusal {
        None => Verdict {
            decision: Decision::Allow,
            rule,
            reason: None,
            code: None,
            host_rule,
            hint: None,
        },
        Some(r) if p.mode == Mode::Warn => Verdict {
            decision: Decision::Warn,
            hint: Some(r.fix.hint(p)),
            rule: r.rule,
            reason: Some(r.reason),
            code: Some(r.code),
            host_rule,
        },
        Some(r) => Verdict {
            decision: Decision::Deny,
            hint: Some(r.fix.hint(p)),
            rule: r.rule,
            reason: Some(r.reason),
            code: Some(r.code),
            host_rule: None,
        },
    }
}

fn host_code(rule: &str) -> DenyCode {
    if rule == DOH_RULE {
        DenyCode::Doh
    } else {
        DenyCode::HostNotAllowed
    }
}

/// The DoH guard's second half: DNS messages to any host, not only the well-known ones.
fn doh_message_refusal(headers: &http::HeaderMap) -> Option<Refusal> {
    let carries_dns = [http::header::CONTENT_TYPE, http::header::ACCEPT]
        .iter()
        .flat_map(|h| headers.get_all(h))
        .filter_map(|v| v.to_str().ok())
        .any(|v| DOH_MEDIA_TYPES.iter().any(|t| contains_ignore_case(v, t)));
    carries_dns.then(|| Refusal {
        reason: "DNS messages over HTTP (DNS over HTTPS, guard `doh`)".into(),
        rule: DOH_RULE.into(),
        code: DenyCode::Doh,
        fix: Fix::DohMessage,
    })
}

/// Whether `hay` contains `needle` (lowercase ASCII), whatever the case of `hay`.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The DoH guard on the destination: a well-known resolver's address, whatever name the
/// client gave.
fn doh_address_refusal(p: &SandboxPolicy, dst: IpAddr) -> Option<Refusal> {
    if !is_doh_address(dst) {
        return None;
    }
    let ip = dst.to_canonical().to_string();
    p.doh_denied(&ip).then(|| Refusal {
        reason: format!("{ip} is a well-known DNS-over-HTTPS resolver (guard `doh`)"),
        rule: DOH_RULE.into(),
        code: DenyCode::Doh,
        fix: Fix::for_host(&ip, DOH_RULE),
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
            code: DenyCode::DnsPinning,
            fix: Fix::Pinning {
                name: ip.to_string(),
            },
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
        code: DenyCode::DnsPinning,
        fix: Fix::Pinning {
            name: name.into_owned(),
        },
    })
}

/// The SSRF guard: loopback, link-local, metadata and private destinations are refused
/// unless the policy names them (`private_ok`, or an IP/CIDR in the allow list).
fn private_refusal(p: &SandboxPolicy, dst: IpAddr) -> Option<Refusal> {
    let dst = dst.to_canonical();
    if !p.guards.private_ranges || !is_guarded_address(dst) || p.private_ok(dst) {
        return None;
    }
    let named = p.allow.has_net_containing(dst) || p.passthrough.has_net_containing(dst);
    (!named).then(|| Refusal {
        reason: format!("destination {dst} is in a private, loopback or link-local range"),
        rule: String::new(),
        code: DenyCode::PrivateDestination,
        fix: Fix::PrivateOk { ip: dst },
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

    const ALLOWED: (Decision, Option<DenyCode>) = (Decision::Allow, None);

    #[test]
    fn deny_codes_are_spelled_alike_by_as_str_and_serde() {
        crate::audit::assert_spelled_alike(&DenyCode::ALL, DenyCode::as_str);
    }

    fn judge(
        p: &SandboxPolicy,
        host: &str,
        headers: &http::HeaderMap,
        resolved: bool,
    ) -> (Decision, Option<DenyCode>) {
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
        (v.decision, v.code)
    }

    #[test]
    fn pinning_refuses_names_that_did_not_resolve_to_the_destination() {
        let none = http::HeaderMap::new();
        let mut flags = allow(&["api.example"]);
        assert_eq!(
            judge(&policy(flags.clone()), "api.example", &none, false),
            ALLOWED,
            "pinning is off by default"
        );
        flags.dns_pinning = true;
        let p = policy(flags);
        assert_eq!(judge(&p, "api.example", &none, true), ALLOWED);
        assert_eq!(
            judge(&p, "api.example", &none, false),
            (Decision::Deny, Some(DenyCode::DnsPinning))
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
        assert_eq!(v.code, Some(DenyCode::DnsPinning), "{v:?}");
        // A host refused by the lists is reported as such, not as a pinning failure.
        assert_eq!(
            judge(&p, "other.example", &none, false),
            (Decision::Deny, Some(DenyCode::HostNotAllowed))
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
                (Decision::Deny, Some(DenyCode::Doh)),
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
            ALLOWED
        );
    }

    #[test]
    fn well_known_doh_hosts_are_refused_under_a_wildcard() {
        let p = policy(allow(&["*"]));
        let none = http::HeaderMap::new();
        assert_eq!(
            judge(&p, "dns.google", &none, true),
            (Decision::Deny, Some(DenyCode::Doh))
        );
        // An allowed name sent to a resolver's address, also written IPv4-mapped.
        for dst in ["1.1.1.1", "::ffff:1.1.1.1", "2606:4700:4700::1111"] {
            let v = request(
                &p,
                &Subject {
                    sni: Some("example.org"),
                    host: "example.org",
                    method: &http::Method::GET,
                    path: "/dns-query",
                    headers: &none,
                    dst: dst.parse().unwrap(),
                },
                &|_| true,
            );
            assert_eq!(
                (v.decision, v.code),
                (Decision::Deny, Some(DenyCode::Doh)),
                "{dst}"
            );
        }
        assert_eq!(judge(&p, "example.org", &none, true), ALLOWED);
    }
}
