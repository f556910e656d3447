//! Command-line surface. Parsing only: [`RunArgs::validate`] turns flags into a
//! [`RunConfig`] that the rest of the program trusts.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::policy::TcpAllow;

const TOP_EXAMPLES: &str = "\
Examples:
  # Run curl in a sandbox; HTTP(S) goes through the proxy, everything else is refused
  sudo egress run -- curl -sS http://example.com/

  # Also let the sandbox reach a database directly, and isolate it in its own netns
  sudo egress run --allow-tcp 10.0.0.0/8:5432 --isolate-net -- ./agent

  # Clean up after runs that were killed with SIGKILL
  sudo egress gc";

const RUN_EXAMPLES: &str = "\
Examples:
  sudo egress run -- curl -sS https://pypi.org/simple/six/
  sudo egress run --user alice --allow-port 22 -- git fetch
  sudo egress run --intercept-port 80 --intercept-port 8080 -- python3 agent.py
  sudo egress --log-format json --log-file /tmp/egress.log run --isolate-net -- ./agent

What the sandbox may do:
  TCP to an intercepted port (80 and 443 unless --intercept-port is given) goes to the proxy,
  which records the process and original destination. TCP to a destination allowed with
  --allow-tcp/--allow-port goes direct. UDP to port 53 passes. Everything else is refused
  with EPERM and logged.

Exit status: the command's own (128+N if it died of signal N); 64 for usage errors, 69 when
the host lacks cgroup v2 or BPF support, 77 for missing privileges.";

/// Transparent egress control for sandboxes and agents, captured with eBPF.
#[derive(Debug, Parser)]
#[command(name = "egress", version, after_help = TOP_EXAMPLES, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EGRESS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Write logs to this file instead of standard error (appends).
    #[arg(long, global = true, value_name = "PATH", env = "EGRESS_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `egress=debug`.
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        env = "RUST_LOG",
        default_value = "info"
    )]
    pub log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a fresh sandbox cgroup behind the proxy.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Remove the cgroups and pinned eBPF state of runs that died without cleaning up.
    Gc,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TCP port whose connects are sent through the proxy (repeatable). Default: 80 and 443.
    #[arg(long = "intercept-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub intercept_ports: Vec<u16>,
    /// Let the sandbox connect directly, to any address, on this TCP port (repeatable).
    #[arg(long = "allow-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub allow_ports: Vec<u16>,
    /// Let the sandbox connect directly to CIDR:PORT, e.g. 10.0.0.0/8:5432, 192.0.2.7:22,
    /// [2001:db8::/32]:443 (repeatable).
    #[arg(long = "allow-tcp", value_name = "CIDR:PORT")]
    pub allow_tcp: Vec<TcpAllow>,
    /// Give the command a fresh network namespace holding only `lo`; the proxy listens inside
    /// it, so the proxy is the only way out.
    #[arg(long)]
    pub isolate_net: bool,
    /// Run the command as this user (name or uid). Default: the user who invoked sudo
    /// ($SUDO_UID), else `nobody`. Root is refused: it could detach the sandbox.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// The user the sandboxed command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// A validated `egress run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub intercept_ports: Vec<u16>,
    pub allow_tcp: Vec<TcpAllow>,
    pub isolate_net: bool,
    pub user: SandboxUser,
    pub command: Vec<OsString>,
}

/// A flag that parsed but makes no sense; reported with the flag's name, exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {why}")]
pub struct UsageError {
    pub flag: &'static str,
    pub why: String,
}

pub const DEFAULT_INTERCEPT_PORTS: [u16; 2] = [80, 443];

impl RunArgs {
    pub fn validate(self) -> Result<RunConfig, UsageError> {
        let mut intercept_ports = if self.intercept_ports.is_empty() {
            DEFAULT_INTERCEPT_PORTS.to_vec()
        } else {
            self.intercept_ports
        };
        intercept_ports.sort_unstable();
        intercept_ports.dedup();

        let mut allow_tcp = self.allow_tcp;
        for p in self.allow_ports {
            allow_tcp.extend(TcpAllow::any_address(p));
        }
        if let Some(a) = allow_tcp.iter().find(|a| intercept_ports.contains(&a.port)) {
            return Err(UsageError {
                flag: "--allow-tcp/--allow-port",
                why: format!(
                    "port {} is intercepted, so connects to it always go through the proxy; \
                     drop the allowance or pass --intercept-port without it",
                    a.port
                ),
            });
        }
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(UsageError {
                flag: "CMD",
                why: "no command given after --".into(),
            });
        }
        let user = resolve_user(self.user.as_deref())?;
        Ok(RunConfig {
            intercept_ports,
            allow_tcp,
            isolate_net: self.isolate_net,
            user,
            command: self.command,
        })
    }
}

fn resolve_user(flag: Option<&str>) -> Result<SandboxUser, UsageError> {
    use nix::unistd::{Uid, User};
    let err = |why: String| UsageError {
        flag: "--user",
        why,
    };
    let user = match flag {
        Some(s) => {
            let by_name = User::from_name(s).map_err(|e| err(format!("looking up {s:?}: {e}")))?;
            let by_uid = || {
                s.parse::<u32>()
                    .ok()
                    .and_then(|u| User::from_uid(Uid::from_raw(u)).ok().flatten())
            };
            by_name
                .or_else(by_uid)
                .ok_or_else(|| err(format!("no such user {s:?}")))?
        }
        None => match std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse::<u32>().ok())
        {
            Some(uid) => User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .ok_or_else(|| err(format!("SUDO_UID={uid} names no user; pass --user")))?,
            None => User::from_name("nobody")
                .ok()
                .flatten()
                .ok_or_else(|| err("no `nobody` user on this host; pass --user".into()))?,
        },
    };
    if user.uid.is_root() {
        return Err(err(
            "refusing to run the command as root: root can detach the eBPF programs and leave \
             the sandbox cgroup; pick an unprivileged user"
                .into(),
        ));
    }
    Ok(SandboxUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("egress").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(r) => r,
            Command::Gc => panic!("parsed as gc"),
        }
    }

    #[test]
    fn defaults_intercept_80_and_443() {
        let c = run_args(&["run", "--user", "nobody", "--", "true"])
            .validate()
            .unwrap();
        assert_eq!(c.intercept_ports, vec![80, 443]);
        assert!(c.allow_tcp.is_empty());
        assert_eq!(c.user.name, "nobody");
    }

    #[test]
    fn allow_port_means_any_address_of_both_families() {
        let c = run_args(&[
            "run",
            "--user",
            "nobody",
            "--allow-port",
            "22",
            "--",
            "true",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.allow_tcp.len(), 2);
        assert!(c
            .allow_tcp
            .iter()
            .all(|a| a.port == 22 && a.net.prefix == 0));
    }

    #[test]
    fn unknown_flag_and_missing_command_are_usage_errors() {
        assert!(parse(&["run", "--bogus", "--", "true"]).is_err());
        assert!(parse(&["run"]).is_err());
        assert!(parse(&["run", "--"]).is_err());
        assert!(parse(&["run", "--allow-tcp", "nonsense", "--", "true"]).is_err());
        assert!(parse(&["run", "--intercept-port", "0", "--", "true"]).is_err());
    }

    #[test]
    fn root_and_unknown_users_are_refused() {
        let e = run_args(&["run", "--user", "root", "--", "true"])
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "--user");
        let e = run_args(&["run", "--user", "no-such-user-egress", "--", "true"])
            .validate()
            .unwrap_err();
        assert!(e.why.contains("no such user"), "{e}");
    }

    #[test]
    fn allowing_an_intercepted_port_is_contradictory() {
        let e = run_args(&[
            "run",
            "--user",
            "nobody",
            "--allow-port",
            "443",
            "--",
            "true",
        ])
        .validate()
        .unwrap_err();
        assert!(e.why.contains("443"), "{e}");
    }

    #[test]
    fn help_has_examples() {
        let e = parse(&["run", "--help"]).unwrap_err();
        assert!(e.to_string().contains("Examples:"));
    }
}
