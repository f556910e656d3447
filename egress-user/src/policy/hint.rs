//! What would allow a refused request or name: one plain line an agent (or its operator) can
//! act on, naming the flag of `egress run` or the policy file's section and key. The 403
//! body and the DNS refusal's Extended DNS Error carry it.
//!
//! Pure: a [`Fix`] says what blocked, [`Fix::hint`] words the remedy for the sandbox's
//! [`Audience`].

use std::net::IpAddr;

use super::model::SandboxPolicy;

/// Who configures the sandbox, and so which remedy to name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Audience {
    /// A daemon sandbox: its section of the policy file.
    #[default]
    PolicyFile,
    /// `egress run`: its flags, and the policy file's section when `--policy` was given.
    Run { file: bool },
}

/// What blocked a request or a name, with what the remedy needs to name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Not in the allowlist.
    Allow { host: String },
    /// On the deny list, by `pattern`.
    Undeny { host: String, pattern: String },
    /// A well-known DoH resolver: allowed only by its exact name.
    DohHost { host: String },
    /// DNS messages over HTTP, to any host.
    DohMessage,
    /// A host rule's `methods` lacks `method`.
    RuleMethod {
        index: usize,
        rule_host: String,
        from_defaults: bool,
        method: String,
    },
    /// A host rule's `paths` match nothing of `path`.
    RulePath {
        index: usize,
        rule_host: String,
        from_defaults: bool,
        path: String,
    },
    /// A path with `.`/`..` segments, which no rule lets through.
    DotSegments,
    /// The private-range guard.
    PrivateOk { ip: IpAddr },
    /// SNI and Host differ.
    Fronting,
    /// The name did not resolve to the destination through egress's DNS.
    Pinning { name: String },
    /// A secret bound for a host it is not for.
    Secret,
}

impl Fix {
    /// The remedy, as one line (two at most, for `egress run` with a policy file).
    pub fn hint(&self, p: &SandboxPolicy) -> String {
        let section = format!("[sandbox.{}]", p.name);
        let (flags, file) = match p.audience {
            Audience::PolicyFile => (false, true),
            Audience::Run { file } => (true, file),
        };
        // "A, or B" when both the file and a flag can do it.
        let either = |in_file: String, flag: String| match (file, flags) {
            (true, true) => format!("{in_file}, or run with {flag}"),
            (true, false) => in_file,
            (false, _) => format!("run with {flag}"),
        };
        match self {
            Fix::Allow { host } => format!(
                "to allow it, {}",
                either(
                    format!("add \"{host}\" to allow in {section}"),
                    format!("--allow {host}")
                )
            ),
            Fix::Undeny { host, pattern } => {
                let how = match (file, flags) {
                    (true, true) => {
                        format!("remove \"{pattern}\" from deny in {section} (or drop --deny {pattern})")
                    }
                    (true, false) => format!("remove \"{pattern}\" from deny in {section}"),
                    (false, _) => format!("drop --deny {pattern}"),
                };
                format!("{host} is on the deny list (\"{pattern}\"); to allow it, {how}")
            }
            Fix::DohHost { host } => format!(
                "a DNS-over-HTTPS resolver is allowed only by its exact name: {}",
                either(
                    format!("add \"{host}\" to allow in {section}"),
                    format!("--allow {host}")
                )
            ),
            Fix::DohMessage => format!(
                "DNS over HTTPS is refused; to allow it, {}",
                either(
                    format!("set guards = {{ doh = false }} in {section}"),
                    "--no-guard doh".into()
                )
            ),
            Fix::RuleMethod {
                index,
                rule_host,
                from_defaults,
                method,
            } => format!(
                "to allow it, add \"{method}\" to methods of the rule with host = \"{rule_host}\" ({})",
                rule_table(p, *index, *from_defaults)
            ),
            Fix::RulePath {
                index,
                rule_host,
                from_defaults,
                path,
            } => format!(
                "to allow it, add \"{}\" (or \"{path}\") to paths of the rule with host = \"{rule_host}\" ({})",
                prefix_glob(path),
                rule_table(p, *index, *from_defaults)
            ),
            Fix::DotSegments => {
                "paths with . or .. segments are never allowed by a rule; send the normalized path"
                    .into()
            }
            Fix::PrivateOk { ip } => format!(
                "to allow it, {}",
                either(
                    format!("add \"{ip}\" to private_ok in {section}"),
                    format!("--private-ok {ip}")
                )
            ),
            Fix::Fronting => format!(
                "send the same name as TLS server name and Host, or {}",
                either(
                    format!("set guards = {{ domain_fronting = false }} in {section}"),
                    "--no-guard domain-fronting".into()
                )
            ),
            Fix::Pinning { name } => format!(
                "resolve {name} through egress's DNS (not /etc/hosts or a hard-coded address) before connecting, or {}",
                if flags && !file {
                    "run without --dns-pinning".to_owned()
                } else {
                    format!("set dns_pinning = false in {section}")
                }
            ),
            Fix::Secret => format!(
                "a secret may be sent only to the hosts of its entry in {section}'s secrets; add this host there, or do not send it"
            ),
        }
    }

    /// What the host lists' refusal of `host` by `rule` (empty, a deny pattern, or the DoH
    /// guard's) needs.
    pub fn for_host(host: &str, rule: &str) -> Fix {
        let host = super::normalize_host(host).into_owned();
        if rule.is_empty() {
            Fix::Allow { host }
        } else if rule == super::DOH_RULE {
            Fix::DohHost { host }
        } else {
            Fix::Undeny {
                host,
                pattern: rule.to_owned(),
            }
        }
    }
}

/// Where a rule sits: the sandbox's `[[sandbox.NAME.rule]]` or `[[defaults.rule]]`.
fn rule_table(p: &SandboxPolicy, index: usize, from_defaults: bool) -> String {
    if from_defaults {
        "[[defaults.rule]]".into()
    } else {
        format!("[[sandbox.{}.rule]] number {}", p.name, index + 1)
    }
}

/// `/a/b/c` → `/a/**`; `/` and `/x` stay as they are.
pub fn prefix_glob(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    match path.trim_start_matches('/').split_once('/') {
        Some((first, _)) => format!("/{first}/**"),
        None => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, file::tests::agent, PolicyFlags};

    fn run(file: bool) -> SandboxPolicy {
        let mut p = compile(None, Some("agent"), &PolicyFlags::default())
            .expect("flags compile")
            .sandbox;
        p.audience = Audience::Run { file };
        p
    }

    #[test]
    fn a_host_not_allowed_names_the_flag_or_the_section() {
        let fix = Fix::for_host("Files.Example.com.", "");
        assert_eq!(
            fix.hint(&run(false)),
            "to allow it, run with --allow files.example.com"
        );
        assert_eq!(
            fix.hint(&run(true)),
            "to allow it, add \"files.example.com\" to allow in [sandbox.agent], or run with --allow files.example.com"
        );
        let daemon = agent("[sandbox.agent]\nallow = [\"x.example\"]\n");
        assert_eq!(
            fix.hint(&daemon),
            "to allow it, add \"files.example.com\" to allow in [sandbox.agent]"
        );
    }

    #[test]
    fn deny_doh_and_guards_name_what_to_change() {
        let daemon = agent("[sandbox.agent]\nallow = [\"x.example\"]\n");
        let h = Fix::for_host("a.evil.example", "*.evil.example").hint(&daemon);
        assert!(
            h.contains("remove \"*.evil.example\" from deny in [sandbox.agent]"),
            "{h}"
        );
        assert!(Fix::for_host("a.evil.example", "*.evil.example")
            .hint(&run(false))
            .contains("drop --deny *.evil.example"));
        let h = Fix::for_host("dns.google", crate::policy::DOH_RULE).hint(&run(false));
        assert!(h.contains("--allow dns.google"), "{h}");
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            Fix::PrivateOk { ip }.hint(&run(false)),
            "to allow it, run with --private-ok 10.1.2.3"
        );
        assert!(Fix::PrivateOk { ip }
            .hint(&daemon)
            .contains("add \"10.1.2.3\" to private_ok in [sandbox.agent]"));
        assert!(Fix::Fronting
            .hint(&run(false))
            .contains("--no-guard domain-fronting"));
        assert!(Fix::DohMessage
            .hint(&daemon)
            .contains("guards = { doh = false }"));
    }

    #[test]
    fn rule_refusals_name_the_rule_and_the_line_to_add() {
        let p = agent(
            "[sandbox.agent]\nallow = [\"github.com\"]\n[[sandbox.agent.rule]]\nhost = \"x.example\"\n[[sandbox.agent.rule]]\nhost = \"github.com\"\nmethods = [\"GET\"]\npaths = [\"/api/**\"]\n",
        );
        let method = Fix::RuleMethod {
            index: 1,
            rule_host: "github.com".into(),
            from_defaults: false,
            method: "POST".into(),
        };
        assert_eq!(
            method.hint(&p),
            "to allow it, add \"POST\" to methods of the rule with host = \"github.com\" ([[sandbox.agent.rule]] number 2)"
        );
        let path = Fix::RulePath {
            index: 1,
            rule_host: "github.com".into(),
            from_defaults: true,
            path: "/o/r/issues".into(),
        };
        assert_eq!(
            path.hint(&p),
            "to allow it, add \"/o/**\" (or \"/o/r/issues\") to paths of the rule with host = \"github.com\" ([[defaults.rule]])"
        );
    }

    #[test]
    fn prefix_globs_keep_the_first_segment() {
        assert_eq!(prefix_glob("/simple/six/"), "/simple/**");
        assert_eq!(prefix_glob("/robots.txt"), "/robots.txt");
        assert_eq!(prefix_glob("/"), "/");
        assert_eq!(prefix_glob("/a/b?x=1"), "/a/**");
    }

    #[test]
    fn hints_stay_short() {
        let long = "a".repeat(60) + ".example.com";
        for fix in [
            Fix::for_host(&long, ""),
            Fix::for_host(&long, "*.example.com"),
            Fix::Pinning { name: long.clone() },
        ] {
            let h = fix.hint(&run(true));
            assert!(!h.contains('\n') && h.len() < 250, "{h}");
        }
    }
}
