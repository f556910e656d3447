//! The policy file: a TOML document naming each sandbox and what it may reach, read and
//! compiled once into an immutable [`PolicyFile`] (the types are in `policy/model.rs`).
//!
//! Parsing happens in two steps. Serde fills private `Raw*` structs whose values are all
//! [`toml::Spanned`], so that a value found wrong only later (a bad host pattern, a bad
//! method, a secret with both `env` and `file`) is still reported at its own line and
//! column. Compiling then checks every value and builds the public types. Every error is
//! one [`PolicyError`] reading `path:line:column: key: message`.
//!
//! `[defaults]` takes the same keys as a sandbox. Lists are concatenated (the sandbox's own
//! entries first, so its rules are tried before the defaults' rules); scalars (`mode`, each
//! guard) are taken from the sandbox when it sets them; a secret the sandbox defines under
//! the same placeholder replaces the default one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use toml::Spanned;

use super::{
    glob::PathGlob,
    model::{Guards, HostRule, Mode, PolicyFile, SandboxPolicy, SecretSource, SecretSpec},
};
use crate::{
    located::{child, index, Doc, Located},
    pattern::{HostPattern, IpNet, TcpAllow},
    secrets::check_placeholder,
};

/// Why a policy file could not be loaded. Both variants are the operator's doing; the
/// binary exits with EX_USAGE.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax error, a value of the wrong type or shape, or a value that does not
    /// compile, at its line and column.
    #[error(transparent)]
    Invalid(#[from] Located),
}

/// Reads and compiles the policy file at `path`.
pub fn load(path: &Path) -> Result<PolicyFile, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Compiles a policy document; `path` is only used to name the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<PolicyFile, PolicyError> {
    let src = Source(Doc { text, path });
    let raw: RawFile = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    src.compile(raw)
}

// ---- The document as serde sees it. ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawSandbox>,
    sandbox: Option<Spanned<BTreeMap<Spanned<String>, Spanned<RawSandbox>>>>,
}

type Strings = Vec<Spanned<String>>;
type StringMap = BTreeMap<Spanned<String>, Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    mode: Option<Mode>,
    dns_pinning: Option<bool>,
    guards: Option<RawGuards>,
    #[serde(default)]
    allow: Strings,
    #[serde(default)]
    deny: Strings,
    #[serde(default)]
    passthrough: Strings,
    #[serde(default)]
    tcp: Strings,
    #[serde(default)]
    private_ok: Strings,
    #[serde(default)]
    inbound: Vec<Spanned<u16>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    secrets: BTreeMap<Spanned<String>, Spanned<RawSecret>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuards {
    private_ranges: Option<bool>,
    domain_fronting: Option<bool>,
    doh: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    host: Spanned<String>,
    methods: Option<Spanned<Strings>>,
    paths: Option<Spanned<Strings>>,
    #[serde(default)]
    set_headers: StringMap,
    #[serde(default)]
    add_headers: StringMap,
    #[serde(default)]
    remove_headers: Strings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
    hosts: Option<Spanned<Strings>>,
}

// ---- Compiling. ----

/// The document being compiled, for turning byte spans into `path:line:column`.
/// The document being compiled; errors point into it.
struct Source<'a>(Doc<'a>);

impl Source<'_> {
    fn error(
        &self,
        span: std::ops::Range<usize>,
        key: Option<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        self.0.error(span, key, message).into()
    }

    fn at<T>(&self, value: &Spanned<T>, key: String, message: impl Into<String>) -> PolicyError {
        self.0.at(value, key, message).into()
    }

    fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
        self.0.toml_error(e).into()
    }
}

/// One sandbox (or `[defaults]`) compiled on its own, before the two are merged.
struct Parts {
    mode: Option<Mode>,
    dns_pinning: Option<bool>,
    private_ranges: Option<bool>,
    domain_fronting: Option<bool>,
    doh: Option<bool>,
    allow: Vec<HostPattern>,
    deny: Vec<HostPattern>,
    passthrough: Vec<HostPattern>,
    tcp: Vec<TcpAllow>,
    inbound: Vec<u16>,
    private_ok: Vec<IpNet>,
    rules: Vec<HostRule>,
    secrets: Vec<SecretSpec>,
}

/// Headers whose editing would break message framing or routing; the proxy owns them.
const PROXY_OWNED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

impl Source<'_> {
    fn compile(&self, raw: RawFile) -> Result<PolicyFile, PolicyError> {
        let defaults = match raw.defaults {
            Some(d) => Some(self.parts(d, "defaults")?),
            None => None,
        };
        let no_sandbox =
            "no sandbox defined; add one, e.g. [sandbox.agent] with allow = [\"pypi.org\"]";
        let Some(sandboxes) = raw.sandbox else {
            return Err(self.error(0..0, Some("sandbox".into()), no_sandbox));
        };
        if sandboxes.get_ref().is_empty() {
            return Err(self.at(&sandboxes, "sandbox".into(), no_sandbox));
        }
        let mut out = BTreeMap::new();
        for (name, raw) in in_document_order(sandboxes.into_inner()) {
            let key = child("sandbox", name.get_ref());
            check_name(name.get_ref()).map_err(|m| self.at(&name, key.clone(), m))?;
            let parts = self.parts(raw.into_inner(), &key)?;
            let name = name.into_inner();
            out.insert(name.clone(), merge(name, parts, defaults.as_ref()));
        }
        Ok(PolicyFile { sandboxes: out })
    }

    fn parts(&self, raw: RawSandbox, key: &str) -> Result<Parts, PolicyError> {
        let guards = raw.guards.unwrap_or(RawGuards {
            private_ranges: None,
            domain_fronting: None,
            doh: None,
        });
        let hosts = |list: Strings, name: &str| {
            self.list(list, &child(key, name), |s| {
                s.parse::<HostPattern>().map_err(|e| e.to_string())
            })
        };
        Ok(Parts {
            mode: raw.mode,
            dns_pinning: raw.dns_pinning,
            private_ranges: guards.private_ranges,
            domain_fronting: guards.domain_fronting,
            doh: guards.doh,
            allow: hosts(raw.allow, "allow")?,
            deny: hosts(raw.deny, "deny")?,
            passthrough: hosts(raw.passthrough, "passthrough")?,
            tcp: self.list(raw.tcp, &child(key, "tcp"), |s| {
                let a = s.parse::<TcpAllow>().map_err(|e| e.to_string())?;
                if a.port == 53 {
                    return Err("port 53 always goes to egress's DNS listener".into());
                }
                Ok(a)
            })?,
            inbound: raw
                .inbound
                .iter()
                .enumerate()
                .map(|(i, p)| match *p.get_ref() {
                    0 => Err(self.at(
                        p,
                        index(&child(key, "inbound"), i),
                        "port 0 is not a port; list the ports the sandbox may listen on, e.g. inbound = [8080]",
                    )),
                    port => Ok(port),
                })
                .collect::<Result<_, _>>()?,
            private_ok: self.list(raw.private_ok, &child(key, "private_ok"), parse_net)?,
            rules: raw
                .rule
                .into_iter()
                .enumerate()
                .map(|(i, r)| self.rule(r.into_inner(), &index(&child(key, "rule"), i)))
                .collect::<Result<_, _>>()?,
            secrets: in_document_order(raw.secrets)
                .map(|(placeholder, s)| self.secret(placeholder, s, &child(key, "secrets")))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Compiles each string of a list, naming `key[i]` and the string's own position on error.
    fn list<T>(
        &self,
        list: Strings,
        key: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, PolicyError> {
        list.iter()
            .enumerate()
            .map(|(i, s)| f(s.get_ref()).map_err(|m| self.at(s, index(key, i), m)))
            .collect()
    }

    fn rule(&self, raw: RawRule, key: &str) -> Result<HostRule, PolicyError> {
        let host = raw
            .host
            .get_ref()
            .parse::<HostPattern>()
            .map_err(|e| self.at(&raw.host, child(key, "host"), e.to_string()))?;
        let methods = match raw.methods {
            Some(m) => Some(self.non_empty_list(
                m,
                &child(key, "methods"),
                "empty list; leave `methods` out to allow every method",
                parse_method,
            )?),
            None => None,
        };
        let paths = match raw.paths {
            Some(p) => Some(self.non_empty_list(
                p,
                &child(key, "paths"),
                "empty list; leave `paths` out to allow every path",
                PathGlob::parse,
            )?),
            None => None,
        };
        let set_headers = self.headers(raw.set_headers, &child(key, "set_headers"))?;
        let add_headers = self.headers(raw.add_headers, &child(key, "add_headers"))?;
        let remove_headers = self.list(
            raw.remove_headers,
            &child(key, "remove_headers"),
            parse_header_name,
        )?;
        Ok(HostRule {
            host,
            methods,
            paths,
            set_headers,
            add_headers,
            remove_headers,
            // Set by `merge`, once the defaults' rules have been appended.
            index: 0,
            from_defaults: false,
        })
    }

    /// A list that must not be empty when present: for `methods` and `paths` an empty list
    /// would refuse everything, which is never what was meant.
    fn non_empty_list<T>(
        &self,
        list: Spanned<Strings>,
        key: &str,
        if_empty: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, PolicyError> {
        if list.get_ref().is_empty() {
            return Err(self.at(&list, key.to_owned(), if_empty));
        }
        self.list(list.into_inner(), key, f)
    }

    fn headers(
        &self,
        raw: StringMap,
        key: &str,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, PolicyError> {
        in_document_order(raw)
            .map(|(name, value)| {
                let key = child(key, name.get_ref());
                let n = parse_header_name(name.get_ref()).map_err(|m| self.at(&name, key.clone(), m))?;
                let v = HeaderValue::from_str(value.get_ref()).map_err(|_| {
                    self.at(
                        &value,
                        key,
                        format!(
                            "{:?} is not a valid HTTP header value (visible ASCII, spaces and tabs only)",
                            value.get_ref()
                        ),
                    )
                })?;
                Ok((n, v))
            })
            .collect()
    }

    fn secret(
        &self,
        placeholder: Spanned<String>,
        raw: Spanned<RawSecret>,
        key: &str,
    ) -> Result<SecretSpec, PolicyError> {
        let key = child(key, placeholder.get_ref());
        check_placeholder(placeholder.get_ref())
            .map_err(|e| self.at(&placeholder, key.clone(), e.to_string()))?;
        let span = raw.span();
        let raw = raw.into_inner();
        let source = match (raw.env, raw.file) {
            (Some(env), Some(file)) => {
                // Point at whichever comes second: that is the line to delete.
                let (later, name) = if file.span().start > env.span().start {
                    (file, "file")
                } else {
                    (env, "env")
                };
                return Err(self.at(&later, child(&key, name), "set either `env` or `file`, not both"));
            }
            (Some(env), None) => {
                let name = env.get_ref();
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(self.at(&env, child(&key, "env"), format!("{name:?} is not an environment variable name")));
                }
                SecretSource::Env(name.clone())
            }
            (None, Some(file)) => {
                let p = Path::new(file.get_ref());
                // Relative to what? The proxy's working directory is rarely what the
                // author of the file had in mind.
                if !p.is_absolute() {
                    return Err(self.at(&file, child(&key, "file"), format!("{p:?} is not an absolute path")));
                }
                SecretSource::File(p.to_owned())
            }
            (None, None) => {
                return Err(self.error(
                    span,
                    Some(key),
                    "needs `env` (an environment variable of the egress process) or `file` (a file it reads)",
                ))
            }
        };
        let Some(hosts) = raw.hosts else {
            return Err(self.error(
                span,
                Some(child(&key, "hosts")),
                "missing; list the hosts this secret may be sent to, e.g. hosts = [\"api.openai.com\"]",
            ));
        };
        let hosts = self.non_empty_list(
            hosts,
            &child(&key, "hosts"),
            "empty list; a secret needs at least one host it may be sent to",
            |s| match s.parse::<HostPattern>() {
                Ok(HostPattern::Any) => Err(
                    "a secret sent to every host (`*`) protects nothing; name its hosts".to_owned(),
                ),
                Ok(p) => Ok(p),
                Err(e) => Err(e.to_string()),
            },
        )?;
        Ok(SecretSpec {
            placeholder: placeholder.into_inner(),
            source,
            hosts,
        })
    }
}

fn merge(name: String, own: Parts, defaults: Option<&Parts>) -> SandboxPolicy {
    fn cat<T: Clone>(own: Vec<T>, default: Option<&Vec<T>>) -> Vec<T> {
        let mut v = own;
        v.extend(default.into_iter().flatten().cloned());
        v
    }
    let d = defaults;
    let guards = Guards {
        private_ranges: own
            .private_ranges
            .or(d.and_then(|d| d.private_ranges))
            .unwrap_or(true),
        domain_fronting: own
            .domain_fronting
            .or(d.and_then(|d| d.domain_fronting))
            .unwrap_or(true),
        doh: own.doh.or(d.and_then(|d| d.doh)).unwrap_or(true),
    };
    let own_rules = own.rules.len();
    let mut rules = cat(own.rules, d.map(|d| &d.rules));
    for (i, r) in rules.iter_mut().enumerate() {
        r.index = i;
        r.from_defaults = i >= own_rules;
    }
    let mut secrets = own.secrets;
    let inherited: Vec<_> = d
        .map(|d| &d.secrets)
        .into_iter()
        .flatten()
        .filter(|s| !secrets.iter().any(|o| o.placeholder == s.placeholder))
        .cloned()
        .collect();
    secrets.extend(inherited);
    SandboxPolicy {
        name,
        mode: own.mode.or(d.and_then(|d| d.mode)).unwrap_or_default(),
        guards,
        allow: cat(own.allow, d.map(|d| &d.allow)).into(),
        deny: cat(own.deny, d.map(|d| &d.deny)).into(),
        passthrough: cat(own.passthrough, d.map(|d| &d.passthrough)).into(),
        tcp: cat(own.tcp, d.map(|d| &d.tcp)),
        inbound: {
            let mut v = cat(own.inbound, d.map(|d| &d.inbound));
            v.sort_unstable();
            v.dedup();
            v
        },
        private_ok: cat(own.private_ok, d.map(|d| &d.private_ok)),
        rules: rules.into(),
        secrets,
        dns_pinning: own
            .dns_pinning
            .or(d.and_then(|d| d.dns_pinning))
            .unwrap_or(false),
        audience: Default::default(),
    }
}

/// Map entries sorted by where they sit in the file, so that the first error reported is
/// the first one in the file.
fn in_document_order<V>(
    map: BTreeMap<Spanned<String>, V>,
) -> impl Iterator<Item = (Spanned<String>, V)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v.into_iter()
}

/// Sandbox names: in the policy file, the daemon config and the API alike.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    ok.then_some(())
        .ok_or_else(|| format!("{name:?} is not a sandbox name: 1 to 64 of a-z, 0-9, `_` and `-`"))
}

/// [`IpNet`]'s own parsing, with examples that fit a list of networks (its error, shared
/// with `--private-ok`, offers host patterns).
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|_| {
        format!("{s:?} is not an IP address or CIDR; examples: 10.0.0.0/8, 192.0.2.7, fd00::/8")
    })
}

fn parse_method(s: &str) -> Result<Method, String> {
    // RFC 9110 token characters, minus lowercase: methods are case-sensitive and a
    // lowercase `get` in a policy is a typo that would never match.
    let tchar =
        |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if s.is_empty() || !s.bytes().all(tchar) {
        return Err(format!(
            "{s:?} is not an uppercase HTTP method token, e.g. GET, POST"
        ));
    }
    Method::from_bytes(s.as_bytes()).map_err(|e| format!("{s:?} is not an HTTP method: {e}"))
}

fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("{s:?} is not a valid HTTP header name"))?;
    if PROXY_OWNED_HEADERS.contains(&name.as_str()) {
        return Err(format!(
            "{name} is managed by the proxy (message framing or routing) and cannot be edited"
        ));
    }
    Ok(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::HostDecision;

    const EXAMPLE: &str = include_str!("../../tests/policy_files/example.toml");

    fn compile(text: &str) -> PolicyFile {
        parse(text, Path::new("policy.toml"))
            .unwrap_or_else(|e| panic!("policy should compile: {e}"))
    }

    pub(in crate::policy) fn agent(text: &str) -> SandboxPolicy {
        compile(text)
            .sandboxes
            .remove("agent")
            .expect("sandbox agent is defined")
    }

    pub(crate) fn pats(list: &[&str]) -> Vec<HostPattern> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The one error `text` must produce, as displayed.
    fn error(text: &str) -> String {
        match parse(text, Path::new("p.toml")) {
            Ok(_) => panic!("policy should have been refused:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_error(text: &str, prefix: &str, contains: &str) {
        let e = error(text);
        assert!(e.starts_with(prefix), "expected {prefix:?}..., got {e:?}");
        assert!(e.contains(contains), "expected {contains:?} in {e:?}");
    }

    #[test]
    fn the_documented_example_compiles() {
        let file =
            load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy_files/example.toml"))
                .unwrap_or_else(|e| panic!("example policy should load: {e}"));
        let a = &file.sandboxes["agent"];
        assert_eq!(a.name, "agent");
        assert_eq!(a.mode, Mode::Warn);
        assert_eq!(
            a.guards,
            Guards {
                private_ranges: false,
                domain_fronting: true,
                doh: true
            }
        );
        assert_eq!(
            a.allow,
            pats(&[
                "pypi.org",
                "*.pythonhosted.org",
                "10.1.2.3",
                "192.168.0.0/16"
            ])
        );
        assert_eq!(a.deny, pats(&["upload.pypi.org"]));
        assert_eq!(a.passthrough, pats(&["bank.example"]));
        let tcp: Vec<String> = a.tcp.iter().map(ToString::to_string).collect();
        assert_eq!(tcp, ["10.0.0.0/8:5432", "[2001:db8::/32]:22"]);
        assert_eq!(a.inbound, [8080]);
        assert_eq!(
            a.private_ok,
            [IpNet {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8
            }]
        );
        let r = &a.rules[0];
        assert_eq!(r.host.to_string(), "github.com");
        assert_eq!(r.methods, Some(vec![Method::GET, Method::HEAD]));
        let paths: Vec<String> = r.paths.iter().flatten().map(ToString::to_string).collect();
        assert_eq!(
            paths,
            ["/*/*.git/info/refs", "/*/*.git/git-upload-pack", "/api/**"]
        );
        assert_eq!(
            r.set_headers,
            [(
                HeaderName::from_static("x-egress-sandbox"),
                HeaderValue::from_static("agent")
            )]
        );
        assert_eq!(
            r.add_headers,
            [(
                HeaderName::from_static("x-trace"),
                HeaderValue::from_static("1")
            )]
        );
        assert_eq!(r.remove_headers, [http::header::AUTHORIZATION]);
        assert_eq!(
            a.secrets,
            [SecretSpec {
                placeholder: "EGRESS_SECRET_OPENAI".into(),
                source: SecretSource::Env("OPENAI_API_KEY".into()),
                hosts: pats(&["api.openai.com"]),
            }]
        );
        assert_eq!(compile(EXAMPLE), file, "parse and load agree");
    }

    #[test]
    fn minimal_sandbox_gets_the_defaults() {
        let a = agent("[sandbox.agent]\n");
        assert_eq!(a.mode, Mode::Enforce);
        assert_eq!(a.guards, Guards::default());
        assert!(a.guards.private_ranges && a.guards.domain_fronting);
        assert_eq!(
            a.host_decision("pypi.org"),
            HostDecision::Deny {
                reason: "host is not in the allowlist",
                rule: String::new()
            }
        );
    }

    #[test]
    fn defaults_concatenate_lists_and_yield_scalars_to_the_sandbox() {
        let f = compile(
            r#"
[defaults]
mode = "warn"
guards = { domain_fronting = false, private_ranges = false }
allow = ["pypi.org"]
[[defaults.rule]]
host = "*"
methods = ["GET"]
[defaults.secrets.EGRESS_SECRET_A]
env = "A"
hosts = ["a.example"]
[defaults.secrets.EGRESS_SECRET_B]
env = "B"
hosts = ["b.example"]

[sandbox.strict]
mode = "enforce"
guards = { private_ranges = true }
allow = ["github.com"]
[[sandbox.strict.rule]]
host = "github.com"
paths = ["/**"]
[sandbox.strict.secrets.EGRESS_SECRET_A]
file = "/etc/a"
hosts = ["a.example"]

[sandbox.loose]
"#,
        );
        let s = &f.sandboxes["strict"];
        assert_eq!(s.mode, Mode::Enforce);
        assert_eq!(
            s.guards,
            Guards {
                private_ranges: true,
                domain_fronting: false,
                doh: true
            }
        );
        assert_eq!(s.allow, pats(&["github.com", "pypi.org"]));
        let rules: Vec<_> = s
            .rules
            .iter()
            .map(|r| (r.index, r.host.to_string()))
            .collect();
        assert_eq!(
            rules,
            [(0, "github.com".into()), (1, "*".into())],
            "own rules first"
        );
        let secrets: Vec<_> = s
            .secrets
            .iter()
            .map(|s| (s.placeholder.as_str(), &s.source))
            .collect();
        assert_eq!(
            secrets,
            [
                ("EGRESS_SECRET_A", &SecretSource::File("/etc/a".into())),
                ("EGRESS_SECRET_B", &SecretSource::Env("B".into())),
            ],
            "the sandbox's secret replaces the default of the same name"
        );
        let l = &f.sandboxes["loose"];
        assert_eq!(l.mode, Mode::Warn);
        assert_eq!(
            l.guards,
            Guards {
                private_ranges: false,
                domain_fronting: false,
                doh: true
            }
        );
        assert_eq!(l.allow, pats(&["pypi.org"]));
    }

    #[test]
    fn unknown_key() {
        assert_error(
            "[sandbox.agent]\nallow = []\nalow = [\"x\"]\n",
            "p.toml:3:1: sandbox.agent.alow: unknown field `alow`",
            "expected one of",
        );
        assert_error(
            "[sandbox.agent]\nguards = { private_range = false }\n",
            "p.toml:2:12: sandbox.agent.guards.private_range: unknown field",
            "",
        );
        assert_error(
            "[sandboxes.agent]\n",
            "p.toml:1:2: sandboxes: unknown field `sandboxes`",
            "",
        );
    }

    #[test]
    fn bad_toml_syntax() {
        assert_error(
            "[sandbox.agent]\nallow = [\"a\"\n",
            "p.toml:2:13: -: unclosed array",
            "",
        );
        assert_error("[sandbox.agent\n", "p.toml:1:", "-: ");
    }

    #[test]
    fn bad_host_pattern() {
        assert_error(
            "[sandbox.agent]\nallow = [\"pypi.org\", \"a.b\",\n  \"a.*.com\"]\n",
            "p.toml:3:3: sandbox.agent.allow[2]: \"a.*.com\" is not a host pattern",
            "examples:",
        );
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nhost = \"exa mple.com\"\n",
            "p.toml:3:8: sandbox.agent.rule[0].host: ",
            "not a host pattern",
        );
    }

    #[test]
    fn bad_tcp_and_private_ok() {
        assert_error(
            "[sandbox.agent]\ntcp = [\"10.0.0.0/8:5432\", \"10.0.0.1\"]\n",
            "p.toml:2:27: sandbox.agent.tcp[1]: \"10.0.0.1\" is not CIDR:PORT",
            "missing :PORT",
        );
        assert_error(
            "[sandbox.agent]\ntcp = [\"10.0.0.2:53\"]\n",
            "p.toml:2:8: sandbox.agent.tcp[0]: ",
            "DNS listener",
        );
        assert_error(
            "[sandbox.agent]\nprivate_ok = [\"example.com\"]\n",
            "p.toml:2:15: sandbox.agent.private_ok[0]: ",
            "not an IP address or CIDR",
        );
    }

    #[test]
    fn bad_method() {
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nhost = \"a.com\"\n\n[[sandbox.agent.rule]]\nhost = \"b.com\"\nmethods = [\"GET\", \"get\"]\n",
            "p.toml:7:19: sandbox.agent.rule[1].methods[1]: \"get\" is not an uppercase HTTP method token",
            "",
        );
        assert_error(
            "[sandbox.agent]\nrule = [{ host = \"a.com\", methods = [] }]\n",
            "p.toml:2:37: sandbox.agent.rule[0].methods: empty list",
            "",
        );
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nmethods = [\"GET\"]\n",
            "p.toml:2:1: sandbox.agent.rule[0]: missing field `host`",
            "",
        );
    }

    #[test]
    fn secret_with_both_env_and_file() {
        assert_error(
            "[sandbox.agent.secrets.EGRESS_SECRET_X]\nhosts = [\"a.com\"]\nenv = \"X\"\nfile = \"/etc/x\"\n",
            "p.toml:4:8: sandbox.agent.secrets.EGRESS_SECRET_X.file: set either `env` or `file`, not both",
            "",
        );
    }

    #[test]
    fn secret_without_a_source_or_hosts() {
        assert_error(
            "[sandbox.agent]\n[sandbox.agent.secrets.EGRESS_SECRET_X]\nenv = \"X\"\n",
            "p.toml:2:1: sandbox.agent.secrets.EGRESS_SECRET_X.hosts: missing",
            "",
        );
        assert_error(
            "[sandbox.agent.secrets.EGRESS_SECRET_X]\nenv = \"X\"\nhosts = []\n",
            "p.toml:3:9: sandbox.agent.secrets.EGRESS_SECRET_X.hosts: empty list; a secret needs",
            "",
        );
        assert_error(
            "[sandbox.agent.secrets.EGRESS_SECRET_X]\nhosts = [\"a.com\"]\n",
            "p.toml:1:1: sandbox.agent.secrets.EGRESS_SECRET_X: needs `env`",
            "",
        );
        assert_error(
            "[sandbox.agent.secrets.EGRESS_SECRET_X]\nenv = \"X\"\nhosts = [\"*\"]\n",
            "p.toml:3:10: sandbox.agent.secrets.EGRESS_SECRET_X.hosts[0]: ",
            "protects nothing",
        );
        assert_error(
            "[sandbox.agent.secrets.SHORT]\nenv = \"X\"\nhosts = [\"a.com\"]\n",
            "p.toml:1:24: sandbox.agent.secrets.SHORT: \"SHORT\" is not a placeholder",
            "",
        );
        assert_error(
            "[sandbox.agent.secrets.EGRESS_SECRET_X]\nfile = \"x.key\"\nhosts = [\"a.com\"]\n",
            "p.toml:2:8: sandbox.agent.secrets.EGRESS_SECRET_X.file: ",
            "not an absolute path",
        );
    }

    #[test]
    fn invalid_sandbox_name() {
        assert_error(
            "[sandbox.ok]\n[sandbox.\"Agent Smith\"]\n",
            "p.toml:2:10: sandbox.\"Agent Smith\": \"Agent Smith\" is not a sandbox name",
            "",
        );
        assert_error(
            &format!("[sandbox.{}]\n", "a".repeat(65)),
            "p.toml:1:10: sandbox.",
            "not a sandbox name",
        );
    }

    #[test]
    fn bad_header_name_and_value() {
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nhost = \"a.com\"\nset_headers = { \"X-Ok\" = \"1\", \"Bad Header\" = \"1\" }\n",
            "p.toml:4:31: sandbox.agent.rule[0].set_headers.\"Bad Header\": \"Bad Header\" is not a valid HTTP header name",
            "",
        );
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nhost = \"a.com\"\nadd_headers = { X-Trace = \"a\\nb\" }\n",
            "p.toml:4:27: sandbox.agent.rule[0].add_headers.X-Trace: ",
            "not a valid HTTP header value",
        );
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nhost = \"a.com\"\nremove_headers = [\"Authorization\", \"Content-Length\"]\n",
            "p.toml:4:36: sandbox.agent.rule[0].remove_headers[1]: ",
            "managed by the proxy",
        );
    }

    #[test]
    fn path_glob_must_start_with_a_slash() {
        assert_error(
            "[sandbox.agent]\n[[sandbox.agent.rule]]\nhost = \"a.com\"\npaths = [\"/ok\", \"api/**\"]\n",
            "p.toml:4:17: sandbox.agent.rule[0].paths[1]: path glob \"api/**\" must start with `/`",
            "",
        );
    }

    #[test]
    fn wrong_type() {
        assert_error(
            "[sandbox.agent]\nallow = \"x\"\n",
            "p.toml:2:9: sandbox.agent.allow: invalid type: string \"x\", expected a sequence",
            "",
        );
        assert_error(
            "[sandbox.agent]\nmode = \"block\"\n",
            "p.toml:2:8: sandbox.agent.mode: unknown variant `block`",
            "`enforce` or `warn`",
        );
        assert_error(
            "[sandbox.agent]\nguards = { private_ranges = \"no\" }\n",
            "p.toml:2:29: sandbox.agent.guards.private_ranges: invalid type",
            "",
        );
    }

    #[test]
    fn no_sandboxes() {
        assert_error("", "p.toml:1:1: sandbox: no sandbox defined", "");
        assert_error(
            "[defaults]\nmode = \"warn\"\n",
            "p.toml:1:1: sandbox: no sandbox defined",
            "",
        );
        assert_error(
            "# policy\n[sandbox]\n",
            "p.toml:2:1: sandbox: no sandbox defined",
            "",
        );
    }

    #[test]
    fn defaults_are_checked_too() {
        assert_error(
            "[defaults]\ndeny = [\"**\"]\n[sandbox.a]\n",
            "p.toml:2:9: defaults.deny[0]: ",
            "not a host pattern",
        );
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("nope.toml");
        let e = load(&missing).expect_err("missing file");
        assert!(matches!(&e, PolicyError::Read { path, .. } if *path == missing));
        assert!(e.to_string().contains("nope.toml"), "{e}");
    }

    #[test]
    fn inbound_ports_concatenate_with_defaults_and_refuse_port_0() {
        assert!(agent("[sandbox.agent]\n").inbound.is_empty());
        assert_eq!(
            agent("[defaults]\ninbound = [8080]\n[sandbox.agent]\ninbound = [9000, 8080]\n")
                .inbound,
            [8080, 9000]
        );
        assert_error(
            "[sandbox.agent]\ninbound = [8080, 0]\n",
            "p.toml:2:18: sandbox.agent.inbound[1]: port 0",
            "",
        );
        assert_error(
            "[sandbox.agent]\ninbound = [70000]\n",
            "p.toml:2:12: sandbox.agent.inbound",
            "",
        );
    }

    #[test]
    fn dns_pinning_is_off_unless_set_and_inherits_from_defaults() {
        assert!(!agent("[sandbox.agent]\n").dns_pinning);
        assert!(agent("[sandbox.agent]\ndns_pinning = true\n").dns_pinning);
        assert!(agent("[defaults]\ndns_pinning = true\n[sandbox.agent]\n").dns_pinning);
        assert!(
            !agent("[defaults]\ndns_pinning = true\n[sandbox.agent]\ndns_pinning = false\n")
                .dns_pinning
        );
        assert_error(
            "[sandbox.agent]\ndns_pinning = \"yes\"\n",
            "p.toml:2:15: sandbox.agent.dns_pinning: ",
            "invalid type",
        );
    }
}
