//! One request against the sandbox's policy: host lists, per-host rules, and the guards, in
//! a fixed order, with warn mode turning a refusal into a logged pass.

use std::net::IpAddr;

use crate::policy::file::{
    is_guarded_address, HostDecision, HostRule, Mode, RequestDecision, SandboxPolicy,
};

/// What happens to a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict<'p> {
    /// allow, deny or warn (warn = would have been denied, let through).
    pub decision: &'static str,
    pub rule: String,
    pub reason: Option<String>,
    /// Machine-readable reason for `X-Egress-Denied`.
    pub code: &'static str,
    /// The host rule whose header edits apply.
    pub host_rule: Option<&'p HostRule>,
}

impl Verdict<'_> {
    pub fn denied(&self) -> bool {
        self.decision == "deny"
    }
}

struct Refusal {
    reason: String,
    rule: String,
    code: &'static str,
}

/// Checks, in order: the TLS server name, SNI/Host agreement (domain fronting), the host
/// lists and per-host rules, and private destinations (SSRF). The first refusal decides.
pub fn request<'p>(
    p: &'p SandboxPolicy,
    sni: Option<&str>,
    host: &str,
    method: &http::Method,
    path: &str,
    dst: IpAddr,
) -> Verdict<'p> {
    let mut refusal = None;
    if let Some(sni) = sni {
        if let HostDecision::Deny { reason, rule } = p.host_decision(sni) {
            refusal = Some(Refusal {
                reason: format!("TLS server name: {reason}"),
                rule,
                code: "host-not-allowed",
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
                rule,
                code: "policy",
            });
            (String::new(), None)
        }
        RequestDecision::Allow { rule } => {
            (rule.map(|r| r.host.to_string()).unwrap_or_default(), rule)
        }
    };
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
            decision: "allow",
            rule,
            reason: None,
            code: "",
            host_rule,
        },
        Some(r) if p.mode == Mode::Warn => Verdict {
            decision: "warn",
            rule: r.rule,
            reason: Some(r.reason),
            code: r.code,
            host_rule,
        },
        Some(r) => Verdict {
            decision: "deny",
            rule: r.rule,
            reason: Some(r.reason),
            code: r.code,
            host_rule: None,
        },
    }
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

/// For connections refused before any request (passthrough): the private-range guard only.
pub fn connection_refusal(p: &SandboxPolicy, dst: IpAddr) -> Option<String> {
    let r = private_refusal(p, dst)?;
    (p.mode != Mode::Warn).then_some(r.reason)
}
