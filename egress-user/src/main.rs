//! `egress` binary: parse the command line, validate it into a config, hand it to `app`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use egress_user::{
    app,
    cli::{Cli, Command, LogArgs, LogFormat},
    error_chain, exit,
};

/// mimalloc rather than glibc's malloc: the proxy allocates and frees small buffers on
/// every request from several threads, where glibc's arenas spent about 14% of its CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    if let Err(e) = init_tracing(&cli.log) {
        eprintln!("egress: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let code = match cli.command {
        Command::Run(args) => match args.validate() {
            Err(e) => {
                eprintln!("egress: {e}");
                exit::USAGE
            }
            Ok(cfg) => match runtime().block_on(app::run(cfg)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("egress: {}", error_chain(&e));
                    e.exit_code()
                }
            },
        },
        Command::Ca(cmd) => match app::ca(cmd) {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => {
                eprintln!("egress: {}", error_chain(&e));
                e.exit_code()
            }
        },
        Command::Log(args) => log_view(args),
        Command::Policy(egress_user::cli::PolicyCommand::Suggest(args)) => {
            match app::policy_suggest(&args) {
                Ok(out) => {
                    print!("{out}");
                    0
                }
                Err(e) => {
                    eprintln!("egress: {}", error_chain(&e));
                    e.exit_code()
                }
            }
        }
        Command::Policy(egress_user::cli::PolicyCommand::Check { file }) => {
            match app::policy_check(&file) {
                Ok(out) => {
                    print!("{out}");
                    0
                }
                Err(e) => {
                    eprintln!("egress: {}", error_chain(&e));
                    e.exit_code()
                }
            }
        }
        Command::Daemon(args) => daemon_main(args),
        Command::Sandbox(cmd) => client(sandbox_cmd(cmd)),
        Command::Status(api) => client(status(api)),
        Command::Gc(args) => match app::gc(args.all) {
            Ok(removed) => {
                println!("removed {} dead run(s)", removed.len());
                0
            }
            Err(e) => {
                eprintln!("egress: {}", error_chain(&e));
                e.exit_code()
            }
        },
    };
    ExitCode::from(code)
}

fn daemon_main(args: egress_user::cli::DaemonArgs) -> u8 {
    use egress_user::{cli::DaemonCommand, daemon};
    if let Some(DaemonCommand::Check { file }) = args.check {
        return match daemon::check(&file) {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => {
                eprintln!("egress: {}", error_chain(&e));
                exit::USAGE
            }
        };
    }
    let Some(path) = args.config else {
        eprintln!("egress: daemon: --config FILE is required");
        return exit::USAGE;
    };
    let mut cfg = match daemon::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("egress: {}", error_chain(&e));
            return exit::USAGE;
        }
    };
    // Flags win over the config's TLS keys.
    let trust = args.trust;
    if let (Some(c), Some(k)) = (trust.ca_cert, trust.ca_key) {
        cfg.tls.user_ca = Some((c, k));
    }
    if let Some(d) = trust.upstream_trust_dir {
        cfg.tls.upstream_trust_dir = Some(d);
    }
    cfg.tls.upstream_cas.extend(trust.upstream_cas);
    match runtime().block_on(daemon::run(cfg, args.detach_on_exit)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egress: {}", error_chain(&e));
            e.exit_code()
        }
    }
}

/// Runs one API client command; prints its error and maps it to an exit code.
fn client(f: impl std::future::Future<Output = Result<String, ClientFailure>>) -> u8 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"));
    match rt.block_on(f) {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(ClientFailure::Api(e)) => {
            eprintln!("egress: {}", error_chain(&e));
            e.exit_code()
        }
        Err(ClientFailure::Refused {
            status,
            field,
            message,
        }) => {
            eprintln!("egress: {field}: {message}");
            match status {
                403 => exit::NOPERM,
                400..=499 => exit::USAGE,
                _ => exit::SOFTWARE,
            }
        }
    }
}

enum ClientFailure {
    Api(egress_user::daemon::api::ClientError),
    Refused {
        status: u16,
        field: String,
        message: String,
    },
}

async fn call(
    api: &std::path::Path,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientFailure> {
    let (status, v) = egress_user::daemon::api::call(api, method, path, body)
        .await
        .map_err(ClientFailure::Api)?;
    if status.is_success() {
        return Ok(v);
    }
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    Err(ClientFailure::Refused {
        status: status.as_u16(),
        field: s("field"),
        message: s("error"),
    })
}

async fn sandbox_cmd(cmd: egress_user::cli::SandboxCommand) -> Result<String, ClientFailure> {
    use egress_user::cli::SandboxCommand;
    use http::Method;
    match cmd {
        SandboxCommand::Add(a) => {
            let mut body = serde_json::json!({ "name": a.name });
            let o = body.as_object_mut().expect("an object");
            for (k, v) in [
                ("cgroup", a.cgroup),
                ("docker", a.docker),
                ("pod_uid", a.pod_uid),
                ("container", a.container),
            ] {
                if let Some(v) = v {
                    o.insert(k.into(), v.into());
                }
            }
            if let Some(p) = a.policy {
                o.insert("policy".into(), p.into());
            }
            if let Some(n) = a.netns {
                o.insert("netns".into(), n.into());
            }
            if let Some(p) = a.pid {
                o.insert("pid".into(), p.into());
            }
            if a.strict {
                o.insert("strict".into(), true.into());
            }
            if !a.intercept_ports.is_empty() {
                o.insert("intercept_ports".into(), a.intercept_ports.into());
            }
            if let Some(u) = a.upstream {
                o.insert("upstream".into(), u.into());
            }
            if a.warn {
                o.insert("warn".into(), true.into());
            }
            if a.dns_pinning {
                o.insert("dns_pinning".into(), true.into());
            }
            if !a.no_guard.is_empty() {
                o.insert(
                    "no_guard".into(),
                    serde_json::to_value(&a.no_guard).unwrap_or_default(),
                );
            }
            if let Some(f) = a.learn {
                // The daemon runs elsewhere: a relative path means the caller's directory.
                let f = std::path::absolute(&f).unwrap_or(f);
                o.insert("learn".into(), f.display().to_string().into());
            }
            if let Some(n) = a.learn_wildcard_min {
                o.insert("learn_wildcard_min".into(), n.into());
            }
            let v = call(&a.api.api, Method::POST, "/v1/sandboxes", Some(body)).await?;
            Ok(format!(
                "added {} (id {}, cgroup {}, netns {})\n",
                v["name"].as_str().unwrap_or("?"),
                v["id"],
                v["cgroup"].as_str().unwrap_or("?"),
                v["netns"].as_str().unwrap_or("?")
            ))
        }
        SandboxCommand::Remove { name, api } => {
            let v = call(
                &api.api,
                Method::DELETE,
                &format!("/v1/sandboxes/{name}"),
                None,
            )
            .await?;
            Ok(format!(
                "removed {name} ({} connection(s) cut off at the drain deadline)\n",
                v["cut_off"]
            ))
        }
        SandboxCommand::List { json, api } => {
            let v = call(&api.api, Method::GET, "/v1/sandboxes", None).await?;
            if json {
                return Ok(format!(
                    "{}\n",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                ));
            }
            Ok(sandbox_table(&v))
        }
    }
}

fn sandbox_table(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<20} {:>4} {:<8} {:<16} {:<14} {:>7} {:>6} {:>6} {:>6} {:>6}  CGROUP\n",
        "NAME", "ID", "STATE", "NETNS", "POLICY", "ALLOW", "DENY", "KDENY", "DNS", "ACTIVE"
    );
    for s in v.as_array().into_iter().flatten() {
        let c = &s["counters"];
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let dns: u64 = c["dns_queries"]
            .as_object()
            .map(|m| m.values().map(n).sum())
            .unwrap_or(0);
        out.push_str(&format!(
            "{:<20} {:>4} {:<8} {:<16} {:<14} {:>7} {:>6} {:>6} {:>6} {:>6}  {}\n",
            s["name"].as_str().unwrap_or("?"),
            s["id"],
            s["state"].as_str().unwrap_or("?"),
            s["netns"].as_str().unwrap_or("?"),
            s["policy"].as_str().unwrap_or("?"),
            n(&c["requests"]["allow"]),
            n(&c["requests"]["deny"]),
            n(&c["kernel_denies"]),
            dns,
            n(&c["active_connections"]),
            s["cgroup"].as_str().unwrap_or("?"),
        ));
        if let Some(p) = s["pending"].as_str() {
            out.push_str(&format!("  pending: {p}\n"));
        }
    }
    out
}

async fn status(api: egress_user::cli::ApiArgs) -> Result<String, ClientFailure> {
    let v = call(&api.api, http::Method::GET, "/v1/status", None).await?;
    let mut out = if v["ready"].as_bool() == Some(true) {
        String::from("ready\n")
    } else {
        let mut s = String::from("not ready, pending:\n");
        for p in v["pending"].as_array().into_iter().flatten() {
            s.push_str(&format!("- {}\n", p.as_str().unwrap_or("?")));
        }
        s
    };
    let list = call(&api.api, http::Method::GET, "/v1/sandboxes", None).await?;
    out.push_str(&format!("{} sandbox(es)\n", v["sandboxes"]));
    out.push_str(&sandbox_table(&list));
    Ok(out)
}

fn log_view(args: egress_user::cli::LogViewArgs) -> u8 {
    use egress_user::audit::view;
    let filter = view::Filter {
        sandbox: args.sandbox,
        decision: args.decision,
        host: args.host,
        event: args.event,
    };
    let path = args
        .file
        .unwrap_or_else(|| args.confdir.join("audit.jsonl"));
    let mut out = std::io::stdout().lock();
    let r = if path.as_os_str() == "-" {
        view::run(std::io::stdin().lock(), &mut out, &filter)
    } else {
        match std::fs::File::open(&path) {
            Ok(f) => view::run(std::io::BufReader::new(f), &mut out, &filter),
            Err(e) => {
                eprintln!("egress: cannot read the audit log {}: {e}", path.display());
                return exit::USAGE;
            }
        }
    };
    match r {
        Ok(_) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("egress: {e}");
            exit::SOFTWARE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"))
}

fn init_tracing(args: &LogArgs) -> anyhow::Result<()> {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter =
        EnvFilter::try_new(&args.log).map_err(|e| anyhow::anyhow!("--log {:?}: {e}", args.log))?;
    let writer = match &args.log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| anyhow::anyhow!("--log-file {}: {e}", p.display()))?;
            fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(f))
        }
        None => fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    match args.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}
