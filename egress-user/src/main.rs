//! `egress` binary: parse the command line, validate it into a config, hand it to `app`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use egress_user::{
    app,
    cli::{Cli, Command, LogArgs, LogFormat},
    error_chain, exit,
};

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
        Command::Gc => match app::gc() {
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
