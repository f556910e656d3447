//! The compiled policy of one sandbox: plain values, checked when they were built (by
//! [`super::file`] from a policy file, or by [`super::compile`] from flags alone). How
//! they decide a host or a request is in [`super::eval`].

use std::{collections::BTreeMap, path::PathBuf};

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::glob::PathGlob;
use crate::pattern::{HostList, HostPattern, IpNet, TcpAllow};

/// Every sandbox of one policy file, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFile {
    pub sandboxes: BTreeMap<String, SandboxPolicy>,
}

/// `warn` lets refused traffic through and only records that it would have been refused:
/// for writing a policy against a running agent before enforcing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Warn,
}

/// Checks that apply whatever the lists say. All are on unless turned off explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guards {
    /// Refuse loopback, link-local, metadata and private destinations
    /// ([`is_guarded_address`](super::is_guarded_address)) unless `private_ok` names them.
    pub private_ranges: bool,
    /// Refuse a request whose Host differs from the TLS server name.
    pub domain_fronting: bool,
    /// Refuse DNS over HTTPS: well-known DoH resolvers
    /// ([`is_doh_resolver`](super::is_doh_resolver)) unless an exact (not wildcard) allow or
    /// passthrough entry names them, and any request that carries DNS messages
    /// (`application/dns-message`).
    pub doh: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            private_ranges: true,
            domain_fronting: true,
            doh: true,
        }
    }
}

/// One sandbox's compiled policy. Host lists are default deny: a host must match `allow`
/// or `passthrough`, and a match in `deny` refuses it whatever else matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPolicy {
    pub name: String,
    pub mode: Mode,
    pub guards: Guards,
    pub allow: HostList,
    pub deny: HostList,
    /// Spliced, not decrypted; also allowed.
    pub passthrough: HostList,
    /// Direct (non-proxied) TCP, enforced in the kernel.
    pub tcp: Vec<TcpAllow>,
    /// Ports the sandbox may bind (listen on) on every address, enforced in the kernel;
    /// every other bind is held to loopback. Sorted, no duplicates.
    pub inbound: Vec<u16>,
    /// Destinations exempt from the private-range guard.
    pub private_ok: Vec<IpNet>,
    /// Tried in order; the first whose `host` matches decides.
    pub rules: HostRules,
    pub secrets: Vec<SecretSpec>,
    /// Refuse a connection whose TLS server name or Host did not resolve, through the DNS
    /// listener and for this sandbox, to the address the client connected to.
    pub dns_pinning: bool,
    /// Who configures it: what a refusal's hint names (a flag or the file's section).
    pub audience: super::hint::Audience,
}

/// The host rules in order, with an index of their host patterns ([`HostList`]): the
/// first rule matching a host is found in time that does not grow with the rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRules {
    rules: Vec<HostRule>,
    hosts: HostList,
}

impl HostRules {
    /// The first rule whose host pattern matches `host` (normalized).
    pub fn first_match(&self, host: &str) -> Option<&HostRule> {
        self.hosts.position(host).map(|i| &self.rules[i])
    }
}

impl From<Vec<HostRule>> for HostRules {
    fn from(rules: Vec<HostRule>) -> Self {
        let hosts = rules.iter().map(|r| r.host.clone()).collect();
        HostRules { rules, hosts }
    }
}

impl std::ops::Deref for HostRules {
    type Target = [HostRule];

    fn deref(&self) -> &[HostRule] {
        &self.rules
    }
}

/// Per-host refinements of an allowed host. A rule never admits a host on its own: the host
/// must still pass the host lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRule {
    pub host: HostPattern,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    /// `None`: every path.
    pub paths: Option<Vec<PathGlob>>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    /// Position in [`SandboxPolicy::rules`]; the sandbox's own rules come before those from
    /// `[defaults]`.
    pub index: usize,
    /// Whether it comes from `[defaults]`.
    pub from_defaults: bool,
}

/// Where the egress process reads a secret's real value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the egress process.
    Env(String),
    /// A file; its trailing newline is not part of the value.
    File(PathBuf),
}

/// A secret as the policy file declares it. Reading the value is left to whoever loads it,
/// so that compiling a policy never touches secret material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSpec {
    pub placeholder: String,
    pub source: SecretSource,
    pub hosts: Vec<HostPattern>,
}

impl SandboxPolicy {
    /// Adds command-line patterns to the file's lists. A flag can widen `allow` but never
    /// lift a `deny`: deny is still checked first.
    pub fn merge_flags(
        &mut self,
        allow: &[HostPattern],
        deny: &[HostPattern],
        passthrough: &[HostPattern],
    ) {
        for (list, extra) in [
            (&mut self.allow, allow),
            (&mut self.deny, deny),
            (&mut self.passthrough, passthrough),
        ] {
            for p in extra {
                if !list.contains(p) {
                    list.push(p.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{
        file::tests::{agent, pats},
        HostDecision,
    };

    #[test]
    fn merged_flags_extend_the_lists_but_cannot_lift_a_deny() {
        let mut a = agent("[sandbox.agent]\ndeny = [\"evil.example\"]\n");
        a.merge_flags(
            &pats(&["*"]),
            &pats(&["also-evil.example"]),
            &pats(&["bank.example"]),
        );
        a.merge_flags(&pats(&["*"]), &[], &[]);
        assert_eq!(a.allow, pats(&["*"]), "no duplicates");
        assert!(matches!(
            a.host_decision("evil.example"),
            HostDecision::Deny { .. }
        ));
        assert!(matches!(
            a.host_decision("also-evil.example"),
            HostDecision::Deny { .. }
        ));
        assert!(matches!(
            a.host_decision("bank.example"),
            HostDecision::Passthrough { .. }
        ));
        assert!(matches!(
            a.host_decision("pypi.org"),
            HostDecision::Allow { .. }
        ));
    }
}
