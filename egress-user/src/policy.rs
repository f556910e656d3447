//! What a sandbox may reach, compiled once into an immutable [`LivePolicy`]: the policy
//! file merged with the flags of `egress run` ([`PolicyFlags`]), plus the secrets it
//! declares, loaded. The data path only reads a `LivePolicy`; a reload builds a new one and
//! swaps it in.
//!
//! - [`file`](mod@file): the TOML policy file, with errors located as
//!   `FILE:LINE:COL: key: message`.
//! - `model`: one sandbox's compiled policy ([`SandboxPolicy`], [`HostRule`], [`Guards`]).
//! - `eval`: how that policy decides a host or a request ([`HostDecision`],
//!   [`RequestDecision`]), and the private-address and DoH guards.
//! - `glob`: the path globs of host rules ([`PathGlob`]).
//!
//! The items of the private modules are re-exported here, as are the host, network and
//! TCP patterns from [`crate::pattern`] that policies are written in.

mod eval;
pub mod file;
mod glob;
pub mod hint;
mod model;

pub use crate::pattern::{normalize_host, HostPattern, IpNet, TcpAllow};
pub use eval::{
    is_doh_address, is_doh_resolver, is_guarded_address, HostDecision, RequestDecision,
    DENY_LIST_REASON, DOH_RESOLVERS, DOH_RULE,
};
pub use glob::PathGlob;
pub use model::{Guards, HostRule, Mode, PolicyFile, SandboxPolicy, SecretSource, SecretSpec};

/// Policy flags of `egress run`, applied on top of the policy file (or alone).
#[derive(Clone, Debug, Default)]
pub struct PolicyFlags {
    pub allow: Vec<HostPattern>,
    pub deny: Vec<HostPattern>,
    pub passthrough: Vec<HostPattern>,
    pub tcp: Vec<TcpAllow>,
    /// `--allow-inbound`: ports the sandbox may listen on on every address.
    pub inbound: Vec<u16>,
    pub private_ok: Vec<IpNet>,
    pub warn: bool,
    pub no_private_guard: bool,
    pub no_fronting_guard: bool,
    pub no_doh_guard: bool,
    pub dns_pinning: bool,
    /// Who configures the sandbox: what refusal hints name.
    pub audience: hint::Audience,
}

/// What the data path consults: one sandbox's compiled policy and its loaded secrets.
/// Immutable; a reload builds a new one and swaps it in.
#[derive(Debug)]
pub struct LivePolicy {
    pub sandbox: SandboxPolicy,
    pub secrets: crate::secrets::Secrets,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    File(#[from] file::PolicyError),
    #[error("{path}: no sandbox named {name:?} (it has: {have})")]
    NoSuchSandbox {
        path: std::path::PathBuf,
        name: String,
        have: String,
    },
    #[error("{path}: it defines several sandboxes ({have}); pick one with --sandbox")]
    Ambiguous {
        path: std::path::PathBuf,
        have: String,
    },
    #[error("secret {placeholder}")]
    Secret {
        placeholder: String,
        #[source]
        source: crate::secrets::SecretError,
    },
}

/// Builds the live policy of sandbox `name` from `file` (if any) plus `flags`, loading
/// secret values from egress's own environment and files.
pub fn compile(
    path: Option<&std::path::Path>,
    name: Option<&str>,
    flags: &PolicyFlags,
) -> Result<LivePolicy, CompileError> {
    let mut sandbox = match path {
        None => SandboxPolicy {
            name: name.unwrap_or("run").to_owned(),
            mode: Mode::Enforce,
            guards: Guards::default(),
            allow: Default::default(),
            deny: Default::default(),
            passthrough: Default::default(),
            tcp: vec![],
            inbound: vec![],
            private_ok: vec![],
            rules: Default::default(),
            secrets: vec![],
            dns_pinning: false,
            audience: Default::default(),
        },
        Some(path) => {
            let mut f = file::load(path)?;
            let have = f.sandboxes.keys().cloned().collect::<Vec<_>>().join(", ");
            let key = match name {
                Some(n) => n.to_owned(),
                None if f.sandboxes.len() == 1 => {
                    f.sandboxes.keys().next().cloned().unwrap_or_default()
                }
                None => {
                    return Err(CompileError::Ambiguous {
                        path: path.to_owned(),
                        have,
                    })
                }
            };
            match f.sandboxes.remove(&key) {
                Some(s) => s,
                None => {
                    return Err(CompileError::NoSuchSandbox {
                        path: path.to_owned(),
                        name: key,
                        have,
                    });
                }
            }
        }
    };
    sandbox.merge_flags(&flags.allow, &flags.deny, &flags.passthrough);
    sandbox.tcp.extend(flags.tcp.iter().copied());
    sandbox.private_ok.extend(flags.private_ok.iter().copied());
    sandbox.inbound.extend(flags.inbound.iter().copied());
    sandbox.inbound.sort_unstable();
    sandbox.inbound.dedup();
    if flags.warn {
        sandbox.mode = Mode::Warn;
    }
    if flags.no_private_guard {
        sandbox.guards.private_ranges = false;
    }
    if flags.no_fronting_guard {
        sandbox.guards.domain_fronting = false;
    }
    if flags.no_doh_guard {
        sandbox.guards.doh = false;
    }
    if flags.dns_pinning {
        sandbox.dns_pinning = true;
    }
    sandbox.audience = match flags.audience {
        hint::Audience::Run { .. } => hint::Audience::Run {
            file: path.is_some(),
        },
        a => a,
    };
    let mut secrets = Vec::new();
    for spec in &sandbox.secrets {
        let err = |source| CompileError::Secret {
            placeholder: spec.placeholder.clone(),
            source,
        };
        let value = match &spec.source {
            SecretSource::Env(var) => crate::secrets::SecretValue::from_env(var),
            SecretSource::File(p) => crate::secrets::SecretValue::from_file(p),
        }
        .map_err(err)?;
        secrets.push(
            crate::secrets::Secret::new(spec.placeholder.clone(), value, spec.hosts.clone())
                .map_err(err)?,
        );
    }
    let secrets = crate::secrets::Secrets::new(secrets).map_err(|source| CompileError::Secret {
        placeholder: "(all)".into(),
        source,
    })?;
    Ok(LivePolicy { sandbox, secrets })
}
