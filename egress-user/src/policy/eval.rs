//! How a sandbox's policy decides: the host lists' verdict on a host, then the first
//! matching host rule's on a request, and the guards that hold whatever the lists say
//! (private and metadata addresses, DNS-over-HTTPS resolvers). Pure functions of the
//! compiled [`SandboxPolicy`]; the proxy and the DNS listener call them.

use std::net::{IpAddr, Ipv4Addr};

use http::Method;

use super::{
    hint::Fix,
    model::{HostRule, SandboxPolicy},
};
use crate::pattern::{normalize_host, HostList, HostPattern};

/// What the host lists say about a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostDecision {
    /// `rule` is the deny pattern that matched, or empty when nothing did.
    Deny {
        reason: &'static str,
        rule: String,
    },
    Passthrough {
        rule: String,
    },
    Allow {
        rule: String,
    },
}

/// What the policy says about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestDecision<'p> {
    /// `rule`: the host rule that applies (its header edits are for the caller to make);
    /// `listed`: the allow or passthrough entry that admitted the host.
    Allow {
        rule: Option<&'p HostRule>,
        listed: String,
    },
    Deny {
        reason: String,
        rule: String,
        /// What would let it through.
        fix: Fix,
    },
}

impl SandboxPolicy {
    /// The host lists' verdict for `host` (an SNI or Host value; normalized here). Deny
    /// first, then passthrough, then allow; nothing matching is a deny.
    pub fn host_decision(&self, host: &str) -> HostDecision {
        self.normalized_host_decision(&normalize_host(host))
    }

    fn normalized_host_decision(&self, host: &str) -> HostDecision {
        let find = |list: &HostList| list.first_match(host).map(|p| p.to_string());
        if let Some(rule) = find(&self.deny) {
            return HostDecision::Deny {
                reason: DENY_LIST_REASON,
                rule,
            };
        }
        if self.doh_denied(host) {
            return HostDecision::Deny {
                reason: "a well-known DNS-over-HTTPS resolver (guard `doh`); allow it by its exact name to use it",
                rule: DOH_RULE.to_owned(),
            };
        }
        if let Some(rule) = find(&self.passthrough) {
            return HostDecision::Passthrough { rule };
        }
        if let Some(rule) = find(&self.allow) {
            return HostDecision::Allow { rule };
        }
        HostDecision::Deny {
            reason: "host is not in the allowlist",
            rule: String::new(),
        }
    }

    /// The verdict for one request: the host lists, then the first host rule matching
    /// `host`. `path` may carry a query string; it is ignored.
    pub fn request_decision(&self, host: &str, method: &Method, path: &str) -> RequestDecision<'_> {
        let normalized = normalize_host(host);
        let listed = match self.normalized_host_decision(&normalized) {
            HostDecision::Deny { reason, rule } => {
                return RequestDecision::Deny {
                    reason: reason.to_owned(),
                    fix: Fix::for_host(host, &rule),
                    rule,
                }
            }
            HostDecision::Allow { rule } | HostDecision::Passthrough { rule } => rule,
        };
        let Some(rule) = self.rules.first_match(&normalized) else {
            return RequestDecision::Allow { rule: None, listed };
        };
        let deny = |what: String, fix: Fix| RequestDecision::Deny {
            reason: format!("{what} not allowed by rule {} ({})", rule.index, rule.host),
            rule: format!("rule {} ({})", rule.index, rule.host),
            fix,
        };
        if let Some(methods) = &rule.methods {
            if !methods.contains(method) {
                let fix = Fix::RuleMethod {
                    index: rule.index,
                    rule_host: rule.host.to_string(),
                    from_defaults: rule.from_defaults,
                    method: method.to_string(),
                };
                return deny(format!("method {method}"), fix);
            }
        }
        if let Some(globs) = &rule.paths {
            let path = path.split(['?', '#']).next().unwrap_or_default();
            // The upstream resolves `..` before routing, so `/api/../admin` would pass a
            // `/api/**` glob and reach `/admin`.
            if path.split('/').any(is_dot_segment) {
                return deny(format!("path {path} (dot segments)"), Fix::DotSegments);
            }
            if !globs.iter().any(|g| g.matches(path)) {
                let fix = Fix::RulePath {
                    index: rule.index,
                    rule_host: rule.host.to_string(),
                    from_defaults: rule.from_defaults,
                    path: path.to_owned(),
                };
                return deny(format!("path {path}"), fix);
            }
        }
        RequestDecision::Allow {
            rule: Some(rule),
            listed,
        }
    }

    /// Whether the DoH guard refuses `host` (normalized): a well-known DoH resolver that no
    /// allow or passthrough entry names exactly.
    pub fn doh_denied(&self, host: &str) -> bool {
        self.guards.doh && is_doh_resolver(host) && !self.names_exactly(host)
    }

    /// Whether an allow or passthrough entry names `host` exactly: a name without
    /// wildcard, or a single address.
    fn names_exactly(&self, host: &str) -> bool {
        self.allow.iter().chain(&self.passthrough).any(|p| match p {
            HostPattern::Exact(n) => n == host,
            HostPattern::Net(n) => {
                n.prefix == if n.addr.is_ipv4() { 32 } else { 128 } && p.matches(host)
            }
            HostPattern::Any | HostPattern::Subdomains(_) => false,
        })
    }

    /// Whether `private_ok` exempts `ip` from the private-range guard.
    pub fn private_ok(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.private_ok.iter().any(|n| n.contains(ip))
    }
}

/// `.` or `..`, also percent-encoded (`%2e`), which servers decode before resolving.
fn is_dot_segment(seg: &str) -> bool {
    let rest = strip_dot(seg);
    rest.is_some_and(|r| r.is_empty() || strip_dot(r) == Some(""))
}

fn strip_dot(s: &str) -> Option<&str> {
    s.strip_prefix('.').or_else(|| {
        let head = s.get(..3)?;
        head.eq_ignore_ascii_case("%2e").then(|| &s[3..])
    })
}

/// Destinations a sandbox must not reach by accident: loopback, link-local (including the
/// cloud metadata endpoints 169.254.169.254 and fd00:ec2::254), RFC 1918, CGNAT, unique
/// local, unspecified, and the same addresses written as IPv4-mapped or NAT64 IPv6.
pub fn is_guarded_address(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => guarded_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let [.., a, b, c, d] = v6.octets();
            // A DNS64 resolver can hand out 64:ff9b::a9fe:a9fe, which a NAT64 gateway turns
            // back into 169.254.169.254.
            let nat64 = seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] & 0xfe00) == 0xfc00
                || (nat64 && guarded_v4(Ipv4Addr::new(a, b, c, d)))
        }
    }
}

fn guarded_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    // 0.0.0.0/8 as a whole: Linux delivers 0.0.0.0 to the local host.
    a == 0
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_private()
        || (a == 100 && (b & 0xc0) == 64)
}

/// Public DNS-over-HTTPS endpoints. A policy of `allow = ["*"]` would otherwise let a
/// sandbox resolve (and so exfiltrate) anything through them, beyond the DNS listener.
pub const DOH_RESOLVERS: &[&str] = &[
    "dns.google",
    "dns.google.com",
    "dns64.dns.google",
    "cloudflare-dns.com",
    "*.cloudflare-dns.com",
    "one.one.one.one",
    "1dot1dot1dot1.cloudflare-dns.com",
    "dns.quad9.net",
    "*.quad9.net",
    "doh.opendns.com",
    "*.opendns.com",
    "dns.adguard.com",
    "*.adguard-dns.com",
    "dns.nextdns.io",
    "*.nextdns.io",
    "doh.cleanbrowsing.org",
    "*.cleanbrowsing.org",
    "dns.sb",
    "doh.dns.sb",
    "doh.pub",
    "dns.alidns.com",
    "doh.mullvad.net",
    "*.mullvad.net",
    "dns.controld.com",
    "freedns.controld.com",
    "doh.libredns.gr",
    "dns0.eu",
    "*.dns0.eu",
    // IP-literal DoH (https://1.1.1.1/dns-query).
    "1.1.1.1",
    "1.0.0.1",
    "8.8.8.8",
    "8.8.4.4",
    "9.9.9.9",
    "149.112.112.112",
    "208.67.222.222",
    "208.67.220.220",
    "94.140.14.14",
    "94.140.15.15",
    "2606:4700:4700::1111",
    "2606:4700:4700::1001",
    "2001:4860:4860::8888",
    "2001:4860:4860::8844",
    "2620:fe::fe",
    "2620:fe::9",
];

/// The reason of a refusal by the deny list.
pub const DENY_LIST_REASON: &str = "host is on the deny list";

/// The `rule` of a refusal by the DoH guard.
pub const DOH_RULE: &str = "guard:doh";

/// The well-known DNS-over-HTTPS resolvers, indexed: every request is checked against
/// them, by name and by destination address.
fn doh_resolvers() -> &'static HostList {
    static LIST: std::sync::OnceLock<HostList> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        DOH_RESOLVERS
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
}

/// Whether `host` (normalized) is a well-known DNS-over-HTTPS resolver.
pub fn is_doh_resolver(host: &str) -> bool {
    doh_resolvers().first_match(host).is_some()
}

/// Whether `ip` is the address of a well-known DNS-over-HTTPS resolver.
pub fn is_doh_address(ip: IpAddr) -> bool {
    doh_resolvers().has_net_containing(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::file::tests::agent;

    #[test]
    fn wildcards_do_not_match_the_apex() {
        let a = agent("[sandbox.agent]\nallow = [\"*.example.com\"]\n");
        assert_eq!(
            a.host_decision("api.example.com"),
            HostDecision::Allow {
                rule: "*.example.com".into()
            }
        );
        assert!(matches!(
            a.host_decision("example.com"),
            HostDecision::Deny { .. }
        ));
        assert!(
            matches!(
                a.host_decision("API.Example.com:443"),
                HostDecision::Allow { .. }
            ),
            "hosts are normalized before matching"
        );
    }

    #[test]
    fn deny_beats_allow_and_passthrough() {
        let a = agent(
            "[sandbox.agent]\nallow = [\"*\"]\npassthrough = [\"*.bank.example\"]\ndeny = [\"upload.pypi.org\", \"evil.bank.example\"]\n",
        );
        assert_eq!(
            a.host_decision("upload.pypi.org"),
            HostDecision::Deny {
                reason: "host is on the deny list",
                rule: "upload.pypi.org".into()
            }
        );
        assert!(matches!(
            a.host_decision("evil.bank.example"),
            HostDecision::Deny { .. }
        ));
        assert_eq!(
            a.host_decision("www.bank.example"),
            HostDecision::Passthrough {
                rule: "*.bank.example".into()
            }
        );
        assert_eq!(
            a.host_decision("pypi.org"),
            HostDecision::Allow { rule: "*".into() }
        );
        let r = a.request_decision("upload.pypi.org", &Method::GET, "/");
        assert!(matches!(r, RequestDecision::Deny { .. }), "{r:?}");
    }

    #[test]
    fn passthrough_alone_admits_a_host() {
        let a = agent("[sandbox.agent]\npassthrough = [\"bank.example\"]\n");
        assert_eq!(
            a.host_decision("bank.example"),
            HostDecision::Passthrough {
                rule: "bank.example".into()
            }
        );
        assert_eq!(
            a.request_decision("bank.example", &Method::POST, "/"),
            RequestDecision::Allow {
                rule: None,
                listed: "bank.example".into()
            }
        );
    }

    #[test]
    fn the_first_matching_rule_restricts_methods_and_paths() {
        let a = agent(
            r#"
[sandbox.agent]
allow = ["github.com", "*.github.com", "pypi.org"]
[[sandbox.agent.rule]]
host = "github.com"
methods = ["GET", "HEAD"]
paths = ["/*/*.git/info/refs", "/api/**"]
[[sandbox.agent.rule]]
host = "*.github.com"
methods = ["GET"]
[[sandbox.agent.rule]]
host = "github.com"
methods = ["POST"]
"#,
        );
        let ok = |host, m: Method, path| match a.request_decision(host, &m, path) {
            RequestDecision::Allow { rule, .. } => rule.map(|r| r.index),
            RequestDecision::Deny { reason, .. } => {
                panic!("{m} {host}{path} should pass: {reason}")
            }
        };
        let denied = |host, m: Method, path| match a.request_decision(host, &m, path) {
            RequestDecision::Allow { .. } => panic!("{m} {host}{path} should be refused"),
            RequestDecision::Deny { reason, rule, .. } => format!("{rule}: {reason}"),
        };
        assert_eq!(
            ok(
                "github.com",
                Method::GET,
                "/o/r.git/info/refs?service=git-upload-pack"
            ),
            Some(0)
        );
        assert_eq!(ok("github.com", Method::HEAD, "/api/repos/o/r"), Some(0));
        assert_eq!(ok("api.github.com", Method::GET, "/anything"), Some(1));
        assert_eq!(
            ok("pypi.org", Method::DELETE, "/x"),
            None,
            "no rule: the host lists decide"
        );
        assert_eq!(
            denied("github.com", Method::POST, "/api/x"),
            "rule 0 (github.com): method POST not allowed by rule 0 (github.com)",
            "the first matching rule decides, not a later one that would allow"
        );
        assert_eq!(
            denied("github.com", Method::GET, "/o/r/issues"),
            "rule 0 (github.com): path /o/r/issues not allowed by rule 0 (github.com)"
        );
        assert!(denied("github.com", Method::GET, "/api/../admin").contains("dot segments"));
        assert!(denied("github.com", Method::GET, "/api/%2E%2e/admin").contains("dot segments"));
        assert!(denied("api.github.com", Method::PUT, "/").contains("rule 1 (*.github.com)"));
        assert_eq!(
            denied("gitlab.com", Method::GET, "/"),
            ": host is not in the allowlist",
            "rules never admit a host by themselves"
        );
    }

    #[test]
    fn dot_segments() {
        for seg in [".", "..", "%2e", "%2E.", ".%2e", "%2e%2E"] {
            assert!(is_dot_segment(seg), "{seg}");
        }
        for seg in ["", "...", ".git", "a.", "%2", "%2ex", "%"] {
            assert!(!is_dot_segment(seg), "{seg}");
        }
    }

    #[test]
    fn private_ok_and_guarded_addresses() {
        let a = agent("[sandbox.agent]\nprivate_ok = [\"10.0.0.0/8\", \"fd00::1\"]\n");
        assert!(a.private_ok("10.9.8.7".parse().unwrap()));
        assert!(
            a.private_ok("::ffff:10.9.8.7".parse().unwrap()),
            "v4-mapped counts"
        );
        assert!(a.private_ok("fd00::1".parse().unwrap()));
        assert!(!a.private_ok("fd00::2".parse().unwrap()));
        assert!(!a.private_ok("192.168.1.1".parse().unwrap()));

        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "169.254.169.254",
            "169.254.1.1",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(
                is_guarded_address(ip.parse().unwrap()),
                "{ip} should be guarded"
            );
        }
        for ip in [
            "1.1.1.1",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "100.63.255.255",
            "192.169.0.1",
            "2606:4700::1111",
            "fec0::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(
                !is_guarded_address(ip.parse().unwrap()),
                "{ip} should not be guarded"
            );
        }
    }

    #[test]
    fn doh_resolvers_need_an_exact_entry() {
        let any = agent("[sandbox.agent]\nallow = [\"*\"]\n");
        for h in [
            "dns.google",
            "cloudflare-dns.com",
            "mozilla.cloudflare-dns.com",
            "1.1.1.1",
        ] {
            assert!(
                matches!(any.host_decision(h), HostDecision::Deny { ref rule, .. } if rule == DOH_RULE),
                "{h} passed under allow = [\"*\"]"
            );
        }
        assert!(matches!(
            any.host_decision("pypi.org"),
            HostDecision::Allow { .. }
        ));
        let named = agent("[sandbox.agent]\nallow = [\"dns.google\", \"*.quad9.net\"]\n");
        assert!(matches!(
            named.host_decision("dns.google"),
            HostDecision::Allow { .. }
        ));
        assert!(
            matches!(
                named.host_decision("dns.quad9.net"),
                HostDecision::Deny { .. }
            ),
            "a wildcard is not an exact entry"
        );
        let off = agent("[sandbox.agent]\nallow = [\"*\"]\nguards = { doh = false }\n");
        assert!(matches!(
            off.host_decision("dns.google"),
            HostDecision::Allow { .. }
        ));
    }
}
